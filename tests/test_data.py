"""Tests for the data package (offline, CPU, small vocabularies)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import data
from data import (
    BatchStream,
    DataConfig,
    embedded_documents,
    load_documents,
    load_or_train_tokenizer,
    node_shard,
    pack,
    prepare_blocks,
    split_documents,
    tokenizer_from_json,
    tokenizer_to_json,
    train_bpe_tokenizer,
)
from data import corpus as corpus_module

SAMPLES = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "  leading spaces and\ttabs\nnewlines",
    "Ünïcödé text: 日本語, emoji 🙂, and <|endoftext|> inline.",
    "",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return embedded_documents()


@pytest.fixture(scope="module")
def small_docs(corpus: list[str]) -> list[str]:
    return corpus[:400]


@pytest.fixture(scope="module")
def tok(small_docs: list[str]):
    return train_bpe_tokenizer(small_docs, 512)


def _prose(i: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "model", "expert", "token", "node"]
    rng = random.Random(i)
    return f"Document {i}: " + " ".join(rng.choice(words) for _ in range(40)) + "."


# ---------------------------------------------------------------- corpus


def test_embedded_corpus_is_large_and_deterministic(corpus, tmp_path):
    size = sum(len(d.encode()) for d in corpus)
    assert size > 1_000_000
    assert len(corpus) > 1000
    assert len(set(corpus)) == len(corpus)
    assert min(len(d) for d in corpus) >= 200
    assert list(corpus_module._collect.__wrapped__()) == corpus  # parsed afresh, not the process's memo
    # The optional JSON cache returns the same thing, both when writing and reading.
    assert embedded_documents(tmp_path) == corpus
    assert len(list(tmp_path.glob("embedded-corpus-*.json"))) == 1
    assert embedded_documents(tmp_path) == corpus


def test_one_build_of_the_corpus_serves_every_run_on_the_machine(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SPES_CACHE_DIR", str(tmp_path / "machine"))
    assert embedded_documents(tmp_path / "run-a") == corpus  # kept in the run's cache and the machine's
    (shared,) = (tmp_path / "machine").glob("embedded-corpus-*.json")
    # Another run, in a process that never parsed the stdlib, reads the machine's copy.
    monkeypatch.setattr(corpus_module, "_collect", lambda: pytest.fail("parsed again beside the machine's copy"))
    assert embedded_documents(tmp_path / "run-b") == corpus and (tmp_path / "run-b" / shared.name).exists()
    shared.write_text('{"not": "a list"}')  # a corrupt copy is built again, not trusted
    monkeypatch.setattr(corpus_module, "_collect", lambda: ("a document",))
    assert embedded_documents(tmp_path / "run-c") == ["a document"] == json.loads(shared.read_text())


# ---------------------------------------------------------------- tokenizer


def test_bpe_tokenizer_deterministic_and_special_tokens(small_docs, tok):
    again = train_bpe_tokenizer(small_docs, 512)
    assert tokenizer_to_json(again) == tokenizer_to_json(tok)
    assert len(tok) == 512
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    for text in SAMPLES:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text  # byte level: lossless
    assert tok.eos_token_id in tok(SAMPLES[2]).input_ids


def test_bytes_per_token_counts_the_text_bytes_of_the_rows(tok):
    text = "naïve café"  # 10 characters, 12 UTF-8 bytes
    ids = tok(text, add_special_tokens=False).input_ids
    assert data.bytes_per_token(tok, [ids]) == pytest.approx(12 / len(ids))
    # an end-of-text token is a token with no text: it lowers the bytes per token
    assert data.bytes_per_token(tok, [ids + [tok.eos_token_id]]) == pytest.approx(12 / (len(ids) + 1))
    with pytest.raises(ValueError, match="no tokens"):
        data.bytes_per_token(tok, [])


def test_tokenizer_json_round_trip(tok):
    s = tokenizer_to_json(tok)
    assert isinstance(s, str)
    back = tokenizer_from_json(s)
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id", "eos_token", "pad_token"):
        assert getattr(back, attr) == getattr(tok, attr)
    assert len(back) == len(tok)
    batch = tok(SAMPLES, add_special_tokens=False).input_ids
    assert back(SAMPLES, add_special_tokens=False).input_ids == batch
    assert tokenizer_to_json(back) == s


def test_load_or_train_tokenizer_caches(small_docs, tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return small_docs[:100]

    a = load_or_train_tokenizer("bpe", 300, texts, tmp_path)
    dirs = list(tmp_path.glob("tokenizer-bpe-300-*"))
    assert len(dirs) == 1 and (dirs[0] / "tokenizer.json").exists()
    b = load_or_train_tokenizer("bpe", 300, texts, tmp_path)
    assert b.pad_token == "<|pad|>" and b.eos_token == "<|endoftext|>"
    assert b(SAMPLES).input_ids == a(SAMPLES).input_ids
    # A different text set gets its own cache entry.
    load_or_train_tokenizer("bpe", 300, lambda: small_docs[100:200], tmp_path)
    assert len(list(tmp_path.glob("tokenizer-bpe-300-*"))) == 2


def test_load_local_tokenizer_dir_with_pad_fallback(tok, tmp_path):
    no_pad = tokenizer_from_json(tokenizer_to_json(tok))
    no_pad.pad_token = None
    no_pad.save_pretrained(str(tmp_path / "tk"))
    loaded = load_or_train_tokenizer(str(tmp_path / "tk"), 0, list, tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    assert loaded(SAMPLES).input_ids == tok(SAMPLES).input_ids


def test_unloadable_tokenizer_raises_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="no-such-org/no-such-tokenizer"):
        load_or_train_tokenizer("no-such-org/no-such-tokenizer", 0, list, tmp_path)


# ---------------------------------------------------------------- pack


def test_pack_shapes_and_shift(small_docs, tok):
    docs = small_docs[:50]
    seq_len = 32
    blocks = pack(docs, tok, seq_len)
    assert blocks.dtype == torch.int64
    assert blocks.ndim == 2 and blocks.shape[1] == seq_len + 1
    stream: list[int] = []
    for d in docs:
        stream += tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
    n = len(stream) // (seq_len + 1)
    assert blocks.shape[0] == n > 0
    assert blocks.flatten().tolist() == stream[: n * (seq_len + 1)]
    inputs, labels = blocks[:, :-1], blocks[:, 1:]
    assert inputs.shape == labels.shape == (n, seq_len)
    assert torch.equal(labels[:, :-1], inputs[:, 1:])
    assert pack([], tok, seq_len).shape == (0, seq_len + 1)


# ---------------------------------------------------------------- split


def test_split_disjoint_covering_and_order_independent(corpus):
    train, held = split_documents(corpus, 0.05, seed=0)
    assert set(train).isdisjoint(held)
    assert len(train) + len(held) == len(corpus)
    assert 0.02 < len(held) / len(corpus) < 0.09
    shuffled = corpus[:]
    random.Random(1).shuffle(shuffled)
    train2, held2 = split_documents(shuffled, 0.05, seed=0)
    assert set(held2) == set(held) and set(train2) == set(train)
    _, held3 = split_documents(corpus, 0.05, seed=1)
    assert set(held3) != set(held)


def test_split_never_empty_side():
    for seed in range(20):
        train, held = split_documents(["doc one", "doc two"], 0.05, seed)
        assert len(train) == len(held) == 1
    train, held = split_documents([_prose(i) for i in range(5)], 0.5, 0)
    assert train and held
    with pytest.raises(ValueError):
        split_documents(["only"], 0.1, 0)


# ---------------------------------------------------------------- shards


@pytest.mark.parametrize("mode", ["iid", "contiguous"])
def test_node_shards_disjoint_and_covering(mode):
    n, k = 103, 4
    blocks = torch.arange(n).unsqueeze(1).repeat(1, 9)  # row i is all i
    shards = [node_shard(blocks, p, k, mode, seed=3) for p in range(k)]
    ids = [s[:, 0].tolist() for s in shards]
    assert all(len(x) == n // k for x in ids)
    flat = [i for x in ids for i in x]
    assert len(set(flat)) == len(flat) == n - n % k
    if mode == "contiguous":
        assert ids[1] == list(range(n // k, 2 * (n // k)))
    else:
        assert ids[0] != sorted(ids[0])  # shuffled
        again = node_shard(blocks, 0, k, mode, seed=3)
        assert torch.equal(again, shards[0])


def test_node_shard_errors():
    blocks = torch.zeros(3, 9, dtype=torch.int64)
    with pytest.raises(ValueError, match="out of range"):
        node_shard(blocks, 4, 4, "iid", 0)
    with pytest.raises(ValueError, match="empty"):
        node_shard(blocks, 0, 4, "iid", 0)
    with pytest.raises(ValueError, match="partition"):
        node_shard(blocks, 0, 2, "dirichlet", 0)


# ---------------------------------------------------------------- batches


def test_batch_stream_epochs_and_resume():
    blocks = torch.arange(10).unsqueeze(1).repeat(1, 5)
    s = BatchStream(blocks, batch_size=3, seed=7)
    assert s.batches_per_epoch == 3
    first = [next(s) for _ in range(3)]
    assert all(b.shape == (3, 5) for b in first)
    seen = [i for b in first for i in b[:, 0].tolist()]
    assert len(set(seen)) == 9  # no repeats within an epoch
    second = [next(s) for _ in range(3)]
    assert s.state_dict()["epoch"] in (0, 1)
    assert [b.tolist() for b in first] != [b.tolist() for b in second]

    for stop in (0, 2, 3, 4, 7):
        a = BatchStream(blocks, 3, seed=7)
        for _ in range(stop):
            next(a)
        state = json.loads(json.dumps(a.state_dict()))  # survives serialization
        expected = [next(a) for _ in range(5)]
        b = BatchStream(blocks, 3, seed=7)
        b.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(expected, (next(b) for _ in range(5))))
    with pytest.raises(ValueError):
        BatchStream(blocks, batch_size=11)


# ---------------------------------------------------------------- local files


def _write_sources(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": _prose(i), "id": i}) + "\n" for i in range(6)))
    js = root / "b.json"
    js.write_text(json.dumps([{"body": _prose(i)} for i in range(6, 9)]))
    txt = root / "c.txt"
    txt.write_text("\n\n".join(_prose(i) for i in range(9, 13)) + "\n")
    md = root / "d.md"
    md.write_text("# Title\n\nSome *markdown* paragraph.\n")
    return {"jsonl": jsonl, "json": js, "txt": txt, "md": md}


def test_load_local_files(tmp_path):
    import pandas as pd

    files = _write_sources(tmp_path / "src")
    pq = tmp_path / "e.parquet"
    pd.DataFrame({"text": [_prose(i) for i in range(20, 23)]}).to_parquet(pq)
    cache = tmp_path / "cache"

    def load(source, **kw):
        return load_documents(DataConfig(source=str(source), **kw), cache)

    assert load(files["jsonl"]) == [_prose(i) for i in range(6)]
    assert load(files["json"], text_field="body") == [_prose(i) for i in range(6, 9)]
    assert load(files["txt"]) == [_prose(i) for i in range(9, 13)]  # one doc per paragraph
    assert load(files["md"]) == ["# Title", "Some *markdown* paragraph."]
    assert load(pq) == [_prose(i) for i in range(20, 23)]
    with pytest.raises(ValueError, match="body"):
        load(files["jsonl"], text_field="body")
    # A directory of text files: paragraphs in path order.
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "z.txt").write_text("zeta para one\n\nzeta para two")
    (d / "a.md").write_text("alpha para")
    (d / "ignored.csv").write_text("x,y\n")
    assert load(d) == ["alpha para", "zeta para one", "zeta para two"]


# ---------------------------------------------------------------- config


def test_config_from_dict_and_validation_errors(tmp_path):
    cfg = DataConfig.from_dict({"seq_len": 64, "partition": "contiguous"})
    assert cfg.seq_len == 64 and cfg.validate() is cfg
    with pytest.raises(ValueError, match="seqlen"):
        DataConfig.from_dict({"seqlen": 64})
    # Paths are checked by check_source (the coordinator's disk), not by validate (values only).
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match="nope.jsonl"):
        data.check_source(DataConfig(source=str(missing)))
    bad = tmp_path / "data.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data\.csv.*\.csv"):
        data.check_source(DataConfig(source=str(bad)))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="empty"):
        data.check_source(DataConfig(source=str(empty_dir)))
    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(seq_len=7).validate()
    for frac in (0.0, -0.1, 0.51, 1.0):
        with pytest.raises(ValueError, match="heldout_fraction"):
            DataConfig(heldout_fraction=frac).validate()
    with pytest.raises(ValueError, match="partition"):
        DataConfig(partition="dirichlet").validate()
    with pytest.raises(ValueError, match="vocab_size"):
        DataConfig(vocab_size=100).validate()
    with pytest.raises(ValueError, match="hf"):
        DataConfig(source="hf:").validate()


# ---------------------------------------------------------------- end to end


def test_prepare_blocks_and_cache(tmp_path, monkeypatch):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": _prose(i)}) + "\n" for i in range(200)))
    cfg = DataConfig(source=str(src), vocab_size=300, seq_len=16, heldout_fraction=0.1)
    cache = tmp_path / "cache"
    tk = data.load_tokenizer(cfg, cache)
    train, held = prepare_blocks(cfg, tk, cache)
    assert train.shape[1] == held.shape[1] == 17
    assert train.dtype == held.dtype == torch.int64
    assert len(train) > 5 * len(held) > 0
    assert len(list(cache.glob("blocks-*.pt"))) == 1
    assert not list(cache.glob("*.tmp*"))

    # A cache hit must not touch the source at all.
    def boom(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr("data.pipeline.load_documents", boom)
    train2, held2 = prepare_blocks(cfg, tk, cache)
    assert torch.equal(train, train2) and torch.equal(held, held2)
    assert train2.dtype == torch.int64
    # Different seq_len -> different cache entry (would need to rebuild).
    with pytest.raises(AssertionError, match="cache miss"):
        prepare_blocks(DataConfig(**{**cfg.__dict__, "seq_len": 32}), tk, cache)
    shard = node_shard(train, 1, 2, cfg.partition, cfg.seed)
    batch = next(BatchStream(shard, batch_size=4, seed=cfg.seed))
    assert batch.shape == (4, 17)
