"""LoRA on the shared backbone: fewer trainable parameters, merged export loads in stock transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from client_app.trainer import TrainConfig, make_optimizer, train_steps
from model import MoEArgs, build_model
from model.lora import LoraArgs, adapter_param_names, apply_lora, merge_and_export
from model.naming import expert_param_names

ARGS = MoEArgs(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, expert_ffn=16)
VOCAB, RANK = 61, 4
HEAD_DIM = 32 // 4


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, VOCAB, (2, 17), generator=g)


def test_lora_trains_adapters_owned_experts_routers_and_norms_only(tmp_path):
    full = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    full_trainable = sum(p.numel() for p in full.parameters() if p.requires_grad)
    model = apply_lora(build_model(ARGS, VOCAB, owned=[0, 1], seed=0), LoraArgs(rank=RANK, alpha=8))
    # Adapters: rank x (in + out) per projection; q/o are 32 -> 32, k/v 32 -> 2 kv heads x 8 = 16.
    q = k = 32
    kv = 2 * HEAD_DIM
    per_layer = RANK * ((q + 32) + (k + kv) + (k + kv) + (32 + q))
    adapters = adapter_param_names(model)
    assert sum(dict(model.named_parameters())[n].numel() for n in adapters) == ARGS.num_layers * per_layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n, _ in model.named_parameters()]
    assert set(expert_param_names(trainable, range(8))) == set(expert_param_names(names, [0, 1]))
    assert not any("embed_tokens" in n or "lm_head" in n or "base_layer" in n for n in trainable)
    assert all(n in trainable for n in names if n.endswith(".mlp.gate.weight"))
    lora_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_trainable < full_trainable, (lora_trainable, full_trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=1e-2, warmup_steps=0)
    opt = make_optimizer(model, cfg)
    train_steps(model, opt, batches(), cfg, 0, 2, 2, torch.device("cpu"))
    after = dict(model.named_parameters())
    frozen = [n for n in names if n not in trainable]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in adapters if ".lora_B." in n)
    assert {id(p) for p in opt.state} == {id(p) for n, p in model.named_parameters() if n in trainable}

    model.eval()
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=x).logits
    out = merge_and_export(model, tmp_path / "merged")
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(stock).__name__ == "Qwen3MoeForCausalLM"
    assert not any("lora" in n for n in stock.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [({"rank": 0}, "rank must be >= 1"), ({"targets": ["gate_proj"]}, "targets")])
def test_bad_lora_args(bad, message):
    with pytest.raises(ValueError, match=message):
        LoraArgs(**bad).validate()
