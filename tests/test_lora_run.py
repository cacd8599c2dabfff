"""An upcycled start with LoRA through the in-process engine: 2 nodes, 2 rounds, a very small model.

The run starts from a dense Qwen3 checkpoint the test builds (model.init=upcycle, the intended
use of LoRA), trains with train.lora_rank=4, and exports a plain Hugging Face model with the
adapters merged; the checkpoint keeps the adapters; what LoRA freezes is still the dense
model's; each node sends fewer bytes than the same run without LoRA would.
"""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from micro import MICRO_MODEL
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from engine.simulate import simulate
from model import count_parameters, load_pretrained
from model.lora import LoraArgs, merge_adapters
from model.naming import is_adapter_name
from server_app import checkpoint

RANK, ALPHA = 4, 16.0
OVERRIDES = [
    "nodes=2",
    "rounds=2",
    "strategy.local_steps=2",
    "strategy.merge.enabled=false",
    *MICRO_MODEL,
    "model.num_experts=8",
    f"train.lora_rank={RANK}",
    "run_name=loratest",
    "engine=inprocess",
]


def dense_checkpoint(path: Path) -> Qwen3ForCausalLM:
    """A random dense Qwen3 of the micro shape (hidden 64, MLP 32 = the expert FFN, 2 layers, 4/2 heads)."""
    torch.manual_seed(3)
    dense = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    ).eval()
    dense.save_pretrained(path)
    return dense


@pytest.fixture(scope="module")
def dense_and_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    dense = dense_checkpoint(out / "dense")
    upcycle = [
        "model.init=upcycle",
        f"model.dense_path={out / 'dense'}",
        "model.vocab_size=512",
        "model.upcycle_noise_std=0.02",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert simulate([*OVERRIDES, *upcycle, f"output_dir={out}"]) == 0
    assert f"(LoRA rank {RANK})" in stdout.getvalue()
    return dense, out / "loratest"


@pytest.fixture(scope="module")
def run_dir(dense_and_run):
    return dense_and_run[1]


def test_what_lora_freezes_is_still_the_dense_models(dense_and_run):
    dense, run_dir = dense_and_run
    stock = AutoModelForCausalLM.from_pretrained(run_dir / "model").state_dict()
    want = dense.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(stock[name], want[name], rtol=0, atol=0)  # frozen: bit-equal after 2 rounds


def lora_trained_by_hand(config, owned: int) -> int:
    """Adapters on q/k/v/o + q/k-norms + 2 layer norms + router per layer, final norm, owned experts."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    adapters = RANK * ((h + q) + 2 * (h + kv) + (q + h))
    per_layer = adapters + 2 * d + 2 * h + config.num_experts * h
    return config.num_hidden_layers * per_layer + h + owned * count_parameters(config)["per_expert"]


def test_export_is_plain_hf_with_the_coordinators_merged_weights(run_dir):
    params, _, _ = checkpoint.load_latest(run_dir / "checkpoint")
    adapters = [n for n in params if is_adapter_name(n)]
    assert len(adapters) == 2 * 4 * 2  # 2 layers x q/k/v/o x A/B: the checkpoint keeps them (resume)
    assert all(params[n].abs().sum() > 0 for n in adapters if ".lora_B." in n)  # trained away from 0
    merged = merge_adapters(params, LoraArgs(RANK, ALPHA))
    ours = load_pretrained(run_dir / "model").eval()
    ours.load_state_dict(merged, strict=True)
    stock = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    assert not any("lora" in n or "base_layer" in n for n in stock.state_dict())
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=x).logits, ours(input_ids=x).logits, rtol=1e-6, atol=1e-6)
    # The exported attention weights are base + alpha/r * B @ A, not the frozen base.
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(stock.state_dict()[f"{q}.weight"], params[f"{q}.weight"])


def test_nodes_send_and_train_the_lora_set_only(run_dir):
    config = load_pretrained(run_dir / "model").config
    c = count_parameters(config)
    owned = 4  # 8 experts over 2 nodes
    lora = lora_trained_by_hand(config, owned)
    full = c["shared"] + owned * c["per_expert"]  # what the same run without LoRA trains and sends
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for r in lines:
        assert r["applied"]
        for node in r["nodes"].values():
            assert node["status"] == "ok"
            assert node["trainable_params"] == lora
            assert node["bytes_up"] == 4 * lora < 4 * full
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainable_params_node"] == lora
    assert summary["final_val_loss"] < summary["first_val_loss"]
