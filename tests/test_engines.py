"""The whole app in a real Flower simulation and through the in-process engine: 2 nodes, 2 rounds, a micro model.

The two engines run the same ServerApp and ClientApp code; in deterministic mode they must give
bit-identical global weights, outer-optimizer state, node states, metrics and bytes.
"""

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from micro import MICRO_MODEL
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from model import count_parameters, load_pretrained
from model.naming import expert_param_names

ROOT = Path(__file__).resolve().parent.parent

OVERRIDES = [
    "nodes=2",
    "rounds=2",
    "strategy.local_steps=3",
    "strategy.merge.enabled=false",
    *MICRO_MODEL,
    "model.num_experts=8",
    "run_name=simtest",
    "deterministic=true",
]
# What differs between two runs however equal they are: clocks, process memory, and which
# simulation actor happened to still hold a node (Flower's choice).
NOT_COMPARED = {
    "wall_s",
    "seconds",  # the guard's scoring time
    "round_seconds",
    "train_seconds",
    "save_wait_seconds",
    "tokens_per_s",
    "peak_mem_mb",
    "resident",
    "timing",  # the coordinator's seconds per phase and the clock time its messages left
}


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    """`python -m sim` as a user runs it; its console output is part of what is tested."""
    out = tmp_path_factory.mktemp("sim")
    proc = subprocess.run(
        [sys.executable, "-m", "sim", *OVERRIDES, f"output_dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "simtest", proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def run_dir(sim_run):
    return sim_run[0]


@pytest.fixture(scope="module")
def inprocess_run(tmp_path_factory):
    """The same run with engine=inprocess, in this process (no SuperLink, no Ray)."""
    from engine.simulate import simulate

    out = tmp_path_factory.mktemp("inprocess")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert simulate([*OVERRIDES, "engine=inprocess", f"output_dir={out}"]) == 0
    return out / "simtest", stdout.getvalue()


def _tensors(path: Path) -> dict:
    return load_file(str(path))


def _comparable(record):
    if isinstance(record, dict):
        return {k: _comparable(v) for k, v in record.items() if k not in NOT_COMPARED}
    return record


def test_inprocess_engine_equals_the_flower_simulation_bit_for_bit(run_dir, inprocess_run):
    ours = inprocess_run[0]
    for rnd in ("round-000001", "round-000002"):
        for name in ("params.safetensors", "outer.safetensors"):
            a, b = _tensors(run_dir / "checkpoint" / rnd / name), _tensors(ours / "checkpoint" / rnd / name)
            assert a.keys() == b.keys() and (a or name == "outer.safetensors"), (rnd, name)  # SPES: no momentum
            assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    flower = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    inproc = [json.loads(x) for x in (ours / "metrics.jsonl").read_text().splitlines()]
    assert [_comparable(r) for r in flower] == [_comparable(r) for r in inproc]
    assert flower[-1]["bytes_up"] > 0 and flower[-1]["nodes"]["0"]["wire_bytes_down"] > 0
    s_flower, s_ours = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ours))
    for key in ("first_val_loss", "final_val_loss", "federated_eval_loss", "tokens_trained", "bytes_up", "bytes_down"):
        assert s_flower[key] == s_ours[key], key
    # In process, one process keeps both nodes: round 2 of each continues its kept model (under
    # Flower, which actor runs a node is Flower's choice, so that count is only bounded there).
    assert s_ours["node_rounds_timed"] == 2 and s_ours["node_rounds_resident"] == 2
    assert [n["resident"] for r in inproc for n in r["nodes"].values()] == [0.0, 0.0, 1.0, 1.0]


def test_inprocess_nodes_leave_the_same_state_on_disk(run_dir, inprocess_run):
    def states(root):
        paths = sorted((root / "nodes").glob("*/partition-*/state/step-000000000006/owned.safetensors"))
        return {p.parents[2].name: _tensors(p) for p in paths}

    flower, ours = states(run_dir), states(inprocess_run[0])
    assert sorted(flower) == sorted(ours) == ["partition-0", "partition-1"]
    for part in flower:
        assert all(torch.equal(flower[part][k], ours[part][k]) for k in flower[part]), part


def test_inprocess_console_is_the_coordinators(inprocess_run):
    lines = inprocess_run[1].replace("\r", "\n").splitlines()
    rounds = [ln for ln in lines if re.search(r"\[spes\] round \d+/2 \| held-out loss", ln)]
    assert [re.search(r"round (\d+)/", ln).group(1) for ln in rounds] == ["0", "1", "2"]
    assert any("engine=inprocess" in ln for ln in lines)


def test_console_has_one_line_per_round_and_no_node_bars(sim_run):
    run_dir, stdout, stderr = sim_run
    assert "\r" not in stdout  # not a terminal: plain lines, no progress bar
    log = (run_dir / "coordinator.log").read_text()
    assert "[spes] round 2/2 | held-out loss" in log and "[spes] done in" in log
    lines = stdout.replace("\r", "\n").splitlines()
    rounds = [ln for ln in lines if re.search(r"\[spes\] round \d+/2 \| held-out loss", ln)]
    assert [re.search(r"round (\d+)/", ln).group(1) for ln in rounds] == ["0", "1", "2"]
    assert "tokens" in rounds[1] and "MB" in rounds[1] and "s/round" in rounds[1]
    assert not any("steps" in ln and "%|" in ln for ln in lines + stderr.splitlines())  # per-step node bars
    assert "ClientAppActor" not in stdout  # Ray's per-worker noise stays in the log file


def test_run_report_names_every_plot(run_dir):
    report = (run_dir / "report.md").read_text()
    for plot in ("loss.png", "traffic.png", "expert_load.png"):
        assert (run_dir / plot).stat().st_size > 0
        assert plot in report


def test_outputs_and_summary(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "final_val_loss",
        "first_val_loss",
        "rounds",
        "nodes",
        "tokens_trained",
        "bytes_up",
        "bytes_down",
        "wall_s",
        "peak_mem_mb_node",
        "trainable_params_node",
        "total_params",
    ):
        assert key in summary, key
    assert summary["rounds"] == 2 and summary["nodes"] == 2
    assert summary["tokens_trained"] == 2 * 2 * 3 * 4 * 64
    assert summary["final_val_loss"] < summary["first_val_loss"]
    assert summary["federated_eval_loss"] is not None  # the nodes' evaluation replies were accepted
    bpt = summary["heldout_bytes_per_token"]
    assert 1 < bpt < 8  # a byte-level BPE of English-like text
    assert summary["final_val_bits_per_byte"] == pytest.approx(summary["final_val_loss"] / math.log(2) / bpt)
    assert f"{summary['final_val_bits_per_byte']:.4f}" in (run_dir / "report.md").read_text()
    assert (run_dir / "loss.png").stat().st_size > 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(set(r["nodes"]) == {"0", "1"} and all(n["status"] == "ok" for n in r["nodes"].values()) for r in lines)
    # Every node round is timed whole; the summary's share outside the loop comes from round 2.
    assert all(n["round_seconds"] > n["train_seconds"] > 0 for r in lines for n in r["nodes"].values())
    assert summary["node_rounds_timed"] == 2 and 0 < summary["node_round_overhead"] < 1
    assert 0 <= summary["node_rounds_resident"] <= 2  # which actor runs a node is Flower's choice


def test_bytes_and_trainable_params_are_analytic(run_dir):
    model = load_pretrained(run_dir / "model")
    c = count_parameters(model.config)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    owned = 4  # 8 experts over 2 nodes
    for r in lines:
        for node in r["nodes"].values():
            assert node["trainable_params"] == c["shared"] + owned * c["per_expert"]
            assert node["bytes_up"] == 4 * (c["shared"] + owned * c["per_expert"])
    # Round 1 sends the full model; round 2 (no merge) everything but the node's own experts.
    assert all(n["bytes_down"] == 4 * c["total"] for n in lines[0]["nodes"].values())
    assert all(n["bytes_down"] == 4 * (c["total"] - owned * c["per_expert"]) for n in lines[1]["nodes"].values())


def test_global_experts_equal_their_owners_copy(run_dir):
    model = load_pretrained(run_dir / "model")
    global_sd = model.state_dict()
    # Each node keeps its newest two states, tagged by global step: 3 and 6 after 2 rounds of H=3.
    parts = sorted((run_dir / "nodes").glob("*/partition-*"))
    assert [sorted(p.name for p in (d / "state").iterdir()) for d in parts] == [
        ["step-000000000003", "step-000000000006"]
    ] * 2
    states = [d / "state" / "step-000000000006" / "owned.safetensors" for d in parts]
    for pid, path in enumerate(states):
        saved = load_file(str(path))
        assert set(saved) == set(expert_param_names(global_sd, range(4 * pid, 4 * pid + 4)))
        for name, tensor in saved.items():
            assert torch.equal(global_sd[name], tensor), name


def test_checkpoint_loads_in_stock_transformers(run_dir):
    stock = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    ours = load_pretrained(run_dir / "model").eval()
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=x).logits, ours(input_ids=x).logits, rtol=1e-6, atol=1e-6)
    assert (run_dir / "model" / "tokenizer.json").exists()


def test_run_json_records_how_each_run_was_made(run_dir, inprocess_run):
    from server_app.provenance import code_commit

    commit = code_commit()
    assert commit is not None and len(commit.split("+")[0]) == 40  # this checkout is a git repository
    for folder, engine in ((run_dir, "flower"), (inprocess_run[0], "inprocess")):
        made = json.loads((folder / "run.json").read_text())
        # A Flower simulation runs an unpacked app bundle: the commit comes from the launcher.
        assert made["commit"] == commit, engine
        assert made["command"].startswith("python -m sim nodes=2 rounds=2") and f"engine={engine}" in (
            made["command"] if engine == "inprocess" else "engine=flower"
        )
        assert made["packages"]["torch"] and made["packages"]["flwr"] and made["packages"]["transformers"]
        assert made["config"]["run_name"] == "simtest" and made["config"]["deterministic"] is True
        assert made["python"] and made["machine"]["cpus"] >= 1 and made["started"].endswith("Z")


def test_export_says_how_it_was_trained_and_is_readable_by_others(run_dir):
    """config.json carries the training's balancing weight, the tokenizer's special tokens and a KV
    cache for generation; files are as readable as the umask allows (mkdtemp alone gives 0700)."""
    import os
    import stat

    from transformers import AutoTokenizer

    config = json.loads((run_dir / "model" / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    assert config["router_aux_loss_coef"] == 0.01 and config["use_cache"] is True
    assert config["max_position_embeddings"] == 64  # data.seq_len of this run, not the preset's 2048
    assert config["bos_token_id"] == tok.bos_token_id is not None and config["eos_token_id"] == tok.eos_token_id
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((run_dir / "model").stat().st_mode) == 0o777 & ~mask
    for f in (run_dir / "model").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name


def test_compare_two_runs_side_by_side(run_dir, inprocess_run, tmp_path):
    """python -m sim.compare on the two engines' runs: one table, the one config key that differs, a plot."""
    proc = subprocess.run(
        [sys.executable, "-m", "sim.compare", str(run_dir), str(inprocess_run[0]), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| simtest |")]
    assert len(rows) == 2 and rows[0].split("|")[2] == rows[1].split("|")[2]  # the same final loss
    assert "| engine | flower | inprocess |" in proc.stdout
    assert (tmp_path / "compare.png").stat().st_size > 0 and (tmp_path / "compare.md").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "sim.compare", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "no summary.json" in bad.stderr
