"""The whole app in a real Flower simulation: 2 nodes, 2 rounds, a very small model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from micro import MICRO_MODEL
from model import count_parameters, load_pretrained
from model.naming import expert_param_names
from sim.__main__ import main as sim_main

OVERRIDES = [
    "nodes=2",
    "rounds=2",
    "strategy.local_steps=3",
    "strategy.merge.enabled=false",
    *MICRO_MODEL,
    "model.num_experts=8",
    "run_name=simtest",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    assert sim_main(OVERRIDES + [f"output_dir={out}"]) == 0
    return out / "simtest"


def test_outputs_and_summary(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_val_loss", "first_val_loss", "rounds", "nodes", "tokens_trained", "bytes_up", "bytes_down",
                "wall_s", "peak_mem_mb_node", "trainable_params_node", "total_params"):
        assert key in summary, key
    assert summary["rounds"] == 2 and summary["nodes"] == 2
    assert summary["tokens_trained"] == 2 * 2 * 3 * 4 * 64
    assert summary["final_val_loss"] < summary["first_val_loss"]
    assert (run_dir / "loss.png").stat().st_size > 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(set(r["nodes"]) == {"0", "1"} and all(n["status"] == "ok" for n in r["nodes"].values()) for r in lines)


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
    states = sorted((run_dir / "nodes").glob("*/partition-*/state/owned.safetensors"))
    assert len(states) == 2
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
