"""Partitioned experts: real memory saving, unchanged maths, standard export."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

from model import MoEArgs, build_model, count_parameters, load_pretrained, set_owned_experts
from model.args import build_config
from model.export import save_hf_atomic
from model.naming import expert_param_names, shared_param_names
from server_app.config import load
from training.trainer import TrainConfig, make_optimizer, train_steps

ARGS = MoEArgs(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, expert_ffn=16)
VOCAB = 97


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, VOCAB, (4, 33), generator=g)


def test_same_logits_as_fused_transformers_model():
    torch.manual_seed(0)
    fused = Qwen3MoeForCausalLM(build_config(ARGS, VOCAB)).eval()
    ours = build_model(ARGS, VOCAB, owned=[0, 1])
    ours.load_state_dict(_fused_to_per_expert(fused.state_dict(), ARGS.num_experts, ARGS.expert_ffn))
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=x).logits, fused(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def _fused_to_per_expert(sd, num_experts, inter):
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e in range(num_experts):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{base}{e}.up_proj.weight"] = v[e, inter:]
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(num_experts):
                out[f"{base}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def test_frozen_experts_unchanged_owned_changed_and_no_optimizer_state():
    owned = [2, 3]
    model = build_model(ARGS, VOCAB, owned=owned, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    opt = make_optimizer(model, cfg)
    train_steps(model, opt, batches(), cfg, 0, 5, 10, torch.device("cpu"))
    after = model.state_dict()
    names = list(after)
    frozen = expert_param_names(names, [e for e in range(ARGS.num_experts) if e not in owned])
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)  # weight decay did not move them
    assert all(not torch.equal(before[n], after[n]) for n in expert_param_names(names, owned))
    assert all(not torch.equal(before[n], after[n]) for n in shared_param_names(names) if "norm" not in n)
    # AdamW state exists exactly for the trainable parameters.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in opt.state} == trainable
    counts = count_parameters(model.config)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts["shared"] + 2 * counts["per_expert"]
    assert sum(p.numel() for p in model.parameters()) == counts["total"]


def test_set_owned_experts_changes_trainable_set():
    model = build_model(ARGS, VOCAB, owned=[0])
    set_owned_experts(model, [5, 6])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    all_names = [n for n, _ in model.named_parameters()]
    assert names == set(shared_param_names(all_names)) | set(expert_param_names(all_names, [5, 6]))
    with pytest.raises(ValueError, match="out of range"):
        set_owned_experts(model, [8])


def test_export_loads_in_stock_transformers_with_same_logits(tmp_path):
    model = build_model(ARGS, VOCAB, owned=[1], seed=3).eval()
    out = save_hf_atomic(model, tmp_path / "ckpt")
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(stock).__name__ == "Qwen3MoeForCausalLM"
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        # Stock runs gate and up as one fused matmul, we run two: equal up to fp32 round-off.
        torch.testing.assert_close(stock(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-6, atol=1e-6)
    again = load_pretrained(out, owned=[0]).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "preset, lo, hi", [("tiny", 3e6, 6e6), ("small", 80e6, 120e6), ("1b", 1.0e9, 1.3e9), ("7b", 6.5e9, 7.5e9)]
)
def test_presets_build_on_meta_with_analytic_counts(preset, lo, hi):
    spec = load([f"model={preset}"])
    model = build_model(spec.model, vocab_size=spec.data.vocab_size, owned=[0], device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(model.config)["total"]
    assert lo <= n <= hi, f"{preset}: {n:,}"


def test_round_peak_memory_is_the_rounds_own_not_the_process_lifetime():
    """Simulated nodes share Ray worker processes: a round must not report an earlier, larger peak."""
    from pathlib import Path

    from training.trainer import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("this kernel/container does not allow resetting VmHWM")
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    lifetime = peak_memory_mb(cpu)
    del big
    model = build_model(ARGS, VOCAB, owned=[0], seed=0)
    cfg = TrainConfig(warmup_steps=0)
    m = train_steps(model, make_optimizer(model, cfg), batches(), cfg, 0, 2, 2, cpu)
    assert m["peak-mem-mb"] < lifetime - 200, (m["peak-mem-mb"], lifetime)
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) <= m["peak-mem-mb"] + 1


def test_bf16_autocast_keeps_fp32_master_weights_and_trains():
    """precision=bf16 (the GPU setting) runs the same step under autocast; trained weights and AdamW
    state stay fp32, the frozen experts are stored in bf16 (what autocast rounds them to anyway)."""
    owned = [0, 1]
    model = build_model(ARGS, VOCAB, owned=owned, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(precision="bf16", lr=1e-2, warmup_steps=0)
    opt = make_optimizer(model, cfg)
    m = train_steps(model, opt, batches(), cfg, 0, 3, 3, torch.device("cpu"))
    assert torch.isfinite(torch.tensor(m["train-loss"]))
    after = model.state_dict()
    frozen = expert_param_names(list(after), [e for e in range(ARGS.num_experts) if e not in owned])
    assert all(after[n].dtype == torch.float32 for n in after if n not in frozen)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert all(after[n].dtype == torch.bfloat16 and torch.equal(before[n].bfloat16(), after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in expert_param_names(list(after), owned))


@pytest.mark.parametrize("frozen_dtype", [None, torch.bfloat16])
def test_empty_build_loaded_equals_initialised_build(frozen_dtype):
    """What a node builds each round (no initialisation, no expert copies) is, once loaded, the model."""
    ref = build_model(ARGS, VOCAB, owned=[1, 5], seed=3, frozen_dtype=frozen_dtype).eval()
    empty = build_model(ARGS, VOCAB, owned=[1, 5], empty=True, frozen_dtype=frozen_dtype)
    empty.load_state_dict(ref.state_dict(), strict=True)
    empty.eval()
    assert dict(ref.named_buffers()).keys() == dict(empty.named_buffers()).keys()
    assert all(torch.equal(b, dict(empty.named_buffers())[n]) for n, b in ref.named_buffers())  # rotary inv_freq
    assert [(n, p.requires_grad, p.dtype) for n, p in ref.named_parameters()] == [
        (n, p.requires_grad, p.dtype) for n, p in empty.named_parameters()
    ]
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=x).logits, empty(input_ids=x).logits)
    # Its experts are views of the two blocks, as after a normal build: training still freezes.
    loss = empty.train()(input_ids=x, labels=x).loss
    loss.backward()
    experts = empty.model.layers[0].mlp.experts
    assert experts[1].gate_proj.weight.grad is not None and experts[0].gate_proj.weight.grad is None
