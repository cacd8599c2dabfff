"""Block-packed experts: grouped GEMM equals the per-expert loop, freezing holds, names stay standard."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from model import MoEArgs, build_model, set_experts_implementation, set_frozen_dtype, set_owned_experts
from model.experts import expert_modules
from model.export import save_hf_atomic
from model.loss import lm_loss
from model.naming import expert_param_names, shared_param_names
from training.trainer import TrainConfig, make_optimizer, train_steps

ARGS = MoEArgs(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, expert_ffn=16)
VOCAB = 97
OWNED = [5, 2, 7]  # not contiguous, not sorted: the block order is a permutation of the experts
CPU = torch.device("cpu")


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, VOCAB, (4, 33), generator=g)


def logits_and_grads(model, impl, x):
    set_experts_implementation(model, impl)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=x).logits
    logits.pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grouped_equals_per_expert_loop_logits_and_grads():
    model = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    x = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = logits_and_grads(model, "loop", x)
    logits, grads = logits_and_grads(model, "grouped", x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in model.named_parameters()]
    assert set(grads) == set(ref_grads) == set(shared_param_names(names)) | set(expert_param_names(names, OWNED))
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)
    # Every owned expert was routed some tokens, so its gradient is a real comparison.
    assert all(grads[n].abs().sum() > 0 for n in expert_param_names(names, OWNED))


@pytest.mark.parametrize("owned", [[], list(range(8))])
def test_grouped_with_an_empty_block_equals_the_loop(owned):
    model = build_model(ARGS, VOCAB, owned=owned, seed=0)
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_grads = logits_and_grads(model, "loop", x)
    logits, grads = logits_and_grads(model, "grouped", x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_parameters_are_views_of_one_owned_and_one_frozen_block_with_standard_names():
    model = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    keys = set(model.state_dict())
    for layer in range(ARGS.num_layers):
        for e in range(ARGS.num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in keys
    assert not any("block" in k or "gate_up" in k for k in keys)
    for mod in expert_modules(model):
        assert mod.owned == (2, 5, 7) and mod.frozen == (0, 1, 3, 4, 6)
        for group, experts in (("owned", mod.owned), ("frozen", mod.frozen)):
            gate_up, down = mod._blocks[group]
            assert gate_up.shape == (len(experts), 2 * ARGS.expert_ffn, ARGS.hidden_size)
            for i, e in enumerate(experts):
                assert mod[e].gate_proj.weight.data_ptr() == gate_up[i, : ARGS.expert_ffn].data_ptr()
                assert mod[e].up_proj.weight.data_ptr() == gate_up[i, ARGS.expert_ffn :].data_ptr()
                assert mod[e].down_proj.weight.data_ptr() == down[i].data_ptr()


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_frozen_experts_bit_identical_no_grad_no_optimizer_state(impl):
    model = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    set_experts_implementation(model, impl)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    opt = make_optimizer(model, cfg)
    train_steps(model, opt, batches(), cfg, 0, 3, 10, CPU)
    after = model.state_dict()
    frozen = expert_param_names(list(after), [e for e in range(ARGS.num_experts) if e not in OWNED])
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in expert_param_names(list(after), OWNED))
    params = dict(model.named_parameters())
    assert {id(p) for p in opt.state} == {id(p) for p in params.values() if p.requires_grad}
    assert all(params[n].grad is None and not params[n].requires_grad for n in frozen)
    # After a backward (before zero_grad), still no gradient on a frozen expert.
    model(input_ids=next(batches(5))).logits.mean().backward()
    assert all(params[n].grad is None for n in frozen)


def test_set_owned_experts_repacks_and_keeps_values():
    model = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    set_experts_implementation(model, "grouped")
    x = torch.randint(0, VOCAB, (2, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(input_ids=x).logits
    set_owned_experts(model, [6, 3])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert expert_modules(model)[0].owned == (3, 6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = list(before)
    assert trainable == set(shared_param_names(names)) | set(expert_param_names(names, [3, 6]))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=1e-6, atol=1e-6)
    # A conversion gives every parameter new storage; the next forward re-packs the blocks.
    model.double()
    mod = expert_modules(model)[0]
    assert mod._blocks["owned"][0].dtype == torch.float64
    assert mod[3].gate_proj.weight.data_ptr() == mod._blocks["owned"][0][0].data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits.float(), ref, rtol=1e-5, atol=1e-5)


def test_bf16_frozen_storage_round_trips_what_the_coordinator_sends():
    coordinator = build_model(ARGS, VOCAB, owned=None, seed=7)
    sent = {k: v.clone() for k, v in coordinator.state_dict().items()}  # fp32 masters
    node = build_model(ARGS, VOCAB, owned=OWNED, seed=0, frozen_dtype=torch.bfloat16)
    node.load_state_dict(sent, strict=True)
    got = node.state_dict()
    names = list(sent)
    frozen = expert_param_names(names, [e for e in range(ARGS.num_experts) if e not in OWNED])
    trained = shared_param_names(names) + expert_param_names(names, OWNED)
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], sent[n].bfloat16()) for n in frozen)
    assert all(got[n].dtype == torch.float32 and torch.equal(got[n], sent[n]) for n in trained)
    # Loading the same fp32 tensors again is a fixed point (cast, not accumulate).
    node.load_state_dict(sent, strict=True)
    assert all(torch.equal(node.state_dict()[n], got[n]) for n in names)
    # bf16 storage halves the frozen experts' bytes.
    frozen_bytes = sum(got[n].numel() * got[n].element_size() for n in frozen)
    assert frozen_bytes * 2 == sum(sent[n].numel() * 4 for n in frozen)


def test_bf16_frozen_storage_trains_exactly_like_fp32_storage_under_autocast():
    """Autocast rounds fp32 frozen weights to bf16 for every matmul: storing them in bf16 changes nothing."""
    cfg = TrainConfig(precision="bf16", lr=1e-2, warmup_steps=0)
    block = next(batches())
    results = []
    for frozen_dtype in (None, torch.bfloat16):
        model = build_model(ARGS, VOCAB, owned=OWNED, seed=0, frozen_dtype=frozen_dtype)
        opt = make_optimizer(model, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, block, cfg.aux_loss_weight, cfg.z_loss_weight).total
        loss.backward()
        opt.step()
        results.append((loss.detach(), model.state_dict()))
    (l32, s32), (l16, s16) = results
    assert torch.equal(l32, l16)
    names = list(s32)
    assert all(torch.equal(s32[k], s16[k]) for k in shared_param_names(names) + expert_param_names(names, OWNED))
    frozen = expert_param_names(names, [e for e in range(ARGS.num_experts) if e not in OWNED])
    assert all(s16[k].dtype == torch.bfloat16 and torch.equal(s32[k].bfloat16(), s16[k]) for k in frozen)


def test_export_with_bf16_frozen_and_permuted_blocks_loads_in_stock_transformers(tmp_path):
    model = build_model(ARGS, VOCAB, owned=OWNED, seed=3, frozen_dtype=torch.bfloat16).eval()
    set_experts_implementation(model, "grouped")
    out = save_hf_atomic(model, tmp_path / "ckpt")
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    # One fp32 checkpoint: the bf16-stored experts are written upcast (exactly representable).
    assert all(p.dtype == torch.float32 for p in stock.parameters())
    set_frozen_dtype(model, None)  # the same values in fp32, to compare logits at fp32
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_auto_takes_the_grouped_gemm_where_torch_has_it_and_rejects_unknown_implementations():
    from torch.nn import functional as F

    from model.experts import _has_grouped_mm

    assert _has_grouped_mm(CPU) == hasattr(F, "grouped_mm")  # torch >= 2.10 has it on CPU too
    model = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    assert {m.implementation for m in expert_modules(model)} == {"auto"}
    with pytest.raises(ValueError, match="experts implementation must be one of"):
        set_experts_implementation(model, "fused")


def test_an_empty_build_once_loaded_converts_like_any_model():
    """The build skips copying garbage into the blocks; a later conversion must copy the loaded values."""
    ref = build_model(ARGS, VOCAB, owned=OWNED, seed=4)
    empty = build_model(ARGS, VOCAB, owned=OWNED, empty=True)
    empty.load_state_dict(ref.state_dict())
    empty.double()
    assert all(torch.equal(t.double(), empty.state_dict()[n]) for n, t in ref.state_dict().items())


def test_sharded_experts_keep_their_ownership_and_storage():
    model = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    m = expert_modules(model)[0]
    m.sharded = True  # as training/parallel.py marks them once FSDP owns the parameters
    m.set_owned(OWNED)  # the same: nothing to change
    with pytest.raises(RuntimeError, match="sharded"):
        m.set_owned([0])
    with pytest.raises(RuntimeError, match="sharded"):
        m.set_owned(OWNED, torch.bfloat16)


def test_sharded_experts_compute_with_the_parameters_fsdp_gives_them():
    """Once FSDP owns the parameters (new storage, not views of the blocks), the grouped GEMM
    stacks the experts' current weights: the loop's logits and gradients, new values included."""
    model = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    g = torch.Generator().manual_seed(7)
    for m in expert_modules(model):
        m.sharded = True  # as training/parallel.py marks them
        for e in range(m.num_experts):
            for lin in (m[e].gate_proj, m[e].up_proj, m[e].down_proj):
                fresh = torch.randn(lin.weight.shape, generator=g) * 0.2
                lin.weight = torch.nn.Parameter(fresh, requires_grad=e in OWNED)
    x = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = logits_and_grads(model, "loop", x)
    logits, grads = logits_and_grads(model, "grouped", x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in model.named_parameters()]
    assert grads.keys() == ref_grads.keys() and set(expert_param_names(names, OWNED)) <= grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_bf16_frozen_experts_take_fp32_activations_without_autocast():
    """Frozen experts stored in bf16, an fp32 model around them and no autocast (a CPU node's
    precision=bf16): each expert casts its input to its own dtype and the layer adds its output
    back in fp32; the per-expert loop agrees with the grouped path, and with an fp32 model whose
    frozen weights are the same bf16 values, to bf16 rounding."""
    model = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    reference = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    set_frozen_dtype(model, torch.bfloat16)
    rounded = {
        n: p.detach().to(torch.bfloat16).float() if p.dtype == torch.bfloat16 else p
        for n, p in model.named_parameters()
    }
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.copy_(rounded[n])
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    logits = {}
    for impl in ("loop", "grouped"):
        set_experts_implementation(model, impl)
        assert {m.implementation for m in expert_modules(model)} == {impl}
        with torch.no_grad():
            logits[impl] = model(input_ids=x).logits
    assert logits["loop"].dtype == torch.float32
    torch.testing.assert_close(logits["loop"], logits["grouped"], rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        want = reference(input_ids=x).logits
    torch.testing.assert_close(logits["loop"], want, rtol=5e-2, atol=5e-2)


def test_a_layer_given_no_tokens_returns_none():
    model = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    layer = expert_modules(model)[0]
    for impl in ("loop", "grouped"):
        set_experts_implementation(model, impl)
        out = layer(torch.zeros(0, ARGS.hidden_size), torch.zeros(0, ARGS.top_k, dtype=torch.long), torch.zeros(0, 2))
        assert out.shape == (0, ARGS.hidden_size)
