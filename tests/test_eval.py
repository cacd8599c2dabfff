"""python -m evaluation: lm-eval-harness on a micro checkpoint, held-out perplexity checked by hand."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import split_documents, train_bpe_tokenizer
from evaluation.checkpoint_eval import hub_status, main
from model import MoEArgs, build_model
from model.export import save_hf_atomic
from server_app.report import write_report
from strategy.round_record import RoundRecord

pytest.importorskip("lm_eval")

SEQ_LEN = 24
HELDOUT_FRACTION = 0.3
WORDS = [
    "the",
    "a",
    "model",
    "node",
    "expert",
    "round",
    "token",
    "shared",
    "weight",
    "merge",
    "router",
    "layer",
    "loss",
    "data",
    "held",
    "out",
]


def _documents():
    # Distinct documents of varied length; some span several scoring windows.
    docs = []
    for i in range(40):
        n = 5 + (i * 7) % 60
        docs.append(" ".join(WORDS[(i * 3 + j * (i % 5 + 1)) % len(WORDS)] for j in range(n)) + f" ({i}).")
    return docs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("evalrun") / "micro"
    docs = _documents()
    corpus = run.parent / "corpus.jsonl"
    run.mkdir()
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_bpe_tokenizer(docs, 300)
    args = MoEArgs(
        hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2, expert_ffn=16, max_seq_len=64
    )
    special = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    save_hf_atomic(build_model(args, len(tok), seed=0, special_tokens=special), run / "model", tok)
    config = {
        "seed": 0,
        "data": {
            "source": str(corpus),
            "text_field": "text",
            "tokenizer": "bpe",
            "vocab_size": 300,
            "seq_len": SEQ_LEN,
            "heldout_fraction": HELDOUT_FRACTION,
            "partition": "iid",
        },
    }
    rounds = [
        RoundRecord(
            round=1,
            applied=True,
            val_loss=5.0,
            train_loss=5.1,
            tokens=10.0,
            bytes_up=1,
            bytes_down=2,
            wall_s=1.0,
            nodes={"0": {"bytes_up": 1, "bytes_down": 2, "status": "ok"}},
        )
    ]
    (run / "metrics.jsonl").write_text(json.dumps(rounds[0].to_dict()) + "\n")
    write_report(run, rounds, {"run_name": "micro", "total_params": 10}, config)  # writes config.json
    return run


def _direct_bits_per_byte(checkpoint, docs, window):
    """Bits per byte as lm-eval's rolling loglikelihood defines it, computed with the model directly.

    Each document is scored alone, preceded by the prefix token (bos, here eos); targets go in chunks
    of `window` tokens and a chunk [a, b) sees the `window` tokens before position b (the first
    chunk: the prefix and the chunk itself). Bits per byte = -sum(log p) / ln 2 / sum(UTF-8 bytes).
    """
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    total_ll, total_bytes = 0.0, 0
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        full = [tok.bos_token_id] + ids  # full[j + 1] == ids[j]
        for a in range(0, len(ids), window):
            b = min(a + window, len(ids))
            start = max(0, b - window)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([full[start:b]])).logits[0].double(), -1)
            targets = torch.tensor(ids[a:b])
            total_ll += logp[-(b - a) :].gather(1, targets[:, None]).sum().item()
        total_bytes += len(doc.encode("utf-8"))
    return -total_ll / math.log(2) / total_bytes


def test_heldout_bits_per_byte_matches_the_model(run_dir, capsys):
    before = sorted(p.relative_to(run_dir.parent) for p in run_dir.parent.rglob("*") if "model" not in p.parts)
    assert main([str(run_dir / "model"), "--tasks", "heldout,downstream", "--batch-size", "4"]) == 0
    report = json.loads((run_dir / "model" / "eval.json").read_text())
    assert (run_dir / "model" / "eval" / "heldout.jsonl").exists()
    # Nothing else is written outside the checkpoint but the run's report (and the run's corpus cache).
    after = sorted(p.relative_to(run_dir.parent) for p in run_dir.parent.rglob("*") if "model" not in p.parts)
    new = {str(p) for p in set(after) - set(before)}
    assert all(p.startswith(".cache") or p in ("micro/report.md",) for p in new), new
    heldout = split_documents(_documents(), HELDOUT_FRACTION, 0)[1]
    assert report["n_samples"]["spes_heldout"] == len(heldout) and report["max_length"] == SEQ_LEN
    got = report["results"]["spes_heldout"]
    want = _direct_bits_per_byte(run_dir / "model", heldout, SEQ_LEN)
    assert got["bits_per_byte"] == pytest.approx(want, abs=1e-3)
    assert got["byte_perplexity"] == pytest.approx(2**want, rel=1e-3)
    # The hub is off in tests: the downstream suite is skipped with one line, not attempted.
    assert len(report["skipped"]) == 1 and "HF_HUB_OFFLINE" in report["skipped"][0]
    out = capsys.readouterr().out
    assert sum(1 for line in out.splitlines() if line.startswith("[eval] skipped:")) == 1
    md = (run_dir / "report.md").read_text()
    assert f"| spes_heldout | bits_per_byte | {got['bits_per_byte']:.4f} |" in md
    assert f"{len(heldout)} documents, in windows of {SEQ_LEN} tokens" in md  # says what text was scored


def test_missing_checkpoint_is_one_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_hub_status_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_status() == "HF_HUB_OFFLINE=1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert hub_status() == "HF_DATASETS_OFFLINE=true"
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert "unreachable" in hub_status(timeout_s=1.0)
