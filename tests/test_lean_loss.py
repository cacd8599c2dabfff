"""Memory-lean loss and the node's memory/speed options: same maths, clear errors where unsupported."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import MoEArgs, build_model
from model.ce import chunked_linear_cross_entropy
from model.loss import lm_loss
from training.trainer import TrainConfig, activation_checkpointing, make_optimizer, train_steps

ARGS = MoEArgs(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, expert_ffn=16)
VOCAB = 97
CPU = torch.device("cpu")


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, VOCAB, (4, 33), generator=g)


def test_chunked_ce_matches_a_hand_computed_value():
    # Two tokens, vocabulary of 3, identity head: logits are the hidden states.
    hidden = torch.tensor([[0.0, math.log(2.0), 0.0], [1.0, 1.0, 1.0]], requires_grad=True)
    weight = torch.eye(3, requires_grad=True)
    targets = torch.tensor([1, 2])
    ce, _ = chunked_linear_cross_entropy(hidden, weight, targets, chunk=1)
    # token 0: softmax([1, 2, 1]/4) at index 1 = 1/2; token 1: uniform, 1/3.
    expected = (-math.log(0.5) - math.log(1 / 3)) / 2
    assert ce.item() == pytest.approx(expected, abs=1e-6)
    ce.backward()
    # d/d logits of token 0 = (softmax - onehot) / 2 = ([1/4, 1/2, 1/4] - [0, 1, 0]) / 2
    torch.testing.assert_close(hidden.grad[0], torch.tensor([0.125, -0.25, 0.125]))


@pytest.mark.parametrize("chunk", [1, 7, 50, 64])
def test_chunked_ce_and_z_loss_equal_the_plain_ones_with_ignored_targets(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    weight = torch.randn(30, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 30, (50,), generator=g)
    targets[[3, 10, 11]] = -100
    logits = F.linear(hidden, weight)
    ref_ce = F.cross_entropy(logits, targets)
    ref_z = torch.logsumexp(logits, -1).pow(2).mean()
    (ref_ce + 0.3 * ref_z).backward()
    ref_gh, ref_gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ce, z = chunked_linear_cross_entropy(hidden, weight, targets, chunk=chunk, with_z=True)
    (ce + 0.3 * z).backward()
    torch.testing.assert_close(ce, ref_ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, ref_z, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, ref_gw, rtol=1e-5, atol=1e-6)


def _loss_and_grads(model, block, lean, autocast=False, **kw):
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        parts = lm_loss(model, block, 0.01, 0.001, lean=lean, **kw)
    parts.total.backward()
    return parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("logit_z_weight", [0.0, 1e-2])
def test_lean_lm_loss_equals_plain_loss_and_gradients_fp32(logit_z_weight):
    model = build_model(ARGS, VOCAB, owned=[1, 4], seed=0)
    block = next(batches())
    plain, g_plain = _loss_and_grads(model, block, lean=False, logit_z_weight=logit_z_weight)
    lean, g_lean = _loss_and_grads(model, block, lean=True, logit_z_weight=logit_z_weight)
    for a, b in ((lean.total, plain.total), (lean.ce, plain.ce), (lean.aux, plain.aux)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert (lean.logit_z is None) == (logit_z_weight == 0)
    assert g_lean.keys() == g_plain.keys() and "lm_head.weight" in g_lean
    for n in g_plain:
        torch.testing.assert_close(g_lean[n], g_plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_lean_lm_loss_under_bf16_autocast_within_1e_3():
    model = build_model(ARGS, VOCAB, owned=[1, 4], seed=0)
    block = next(batches())
    plain, g_plain = _loss_and_grads(model, block, lean=False, autocast=True)
    lean, g_lean = _loss_and_grads(model, block, lean=True, autocast=True)
    assert abs(lean.ce.item() - plain.ce.item()) < 1e-3
    for n in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.experts.4.down_proj.weight"):
        cos = F.cosine_similarity(g_lean[n].flatten(), g_plain[n].flatten(), dim=0)
        assert cos > 0.999, (n, cos)


def test_lean_loss_and_activation_checkpointing_train_like_the_plain_step():
    results = []
    for options in ({}, {"lean_loss": True, "activation_checkpointing": True}):
        model = build_model(ARGS, VOCAB, owned=[0, 3], seed=0)
        cfg = TrainConfig(lr=1e-2, warmup_steps=0, **options)
        opt = make_optimizer(model, cfg)
        m = train_steps(model, opt, batches(), cfg, 0, 3, 3, CPU)
        results.append((m, model.state_dict(), activation_checkpointing(model)))
    (m0, s0, ck0), (m1, s1, ck1) = results
    assert not ck0 and ck1
    assert m1["ce-loss"] == pytest.approx(m0["ce-loss"], rel=1e-5)
    assert m1["train-loss"] == pytest.approx(m0["train-loss"], rel=1e-5)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-4, atol=1e-5, msg=k)


def test_eight_bit_adamw_is_refused_on_cpu_with_the_key_named():
    with pytest.raises(ValueError, match="train.optimizer=adamw8bit"):
        TrainConfig(optimizer="adamw8bit", device="cpu").validate()
    with pytest.raises(ValueError, match="train.optimizer must be one of"):
        TrainConfig(optimizer="sgd").validate()
    TrainConfig(optimizer="adamw8bit", device="cuda").validate()  # allowed where a GPU may exist
    model = build_model(ARGS, VOCAB, owned=[0], seed=0)
    with pytest.raises(ValueError, match="CUDA device"):
        make_optimizer(model, TrainConfig(optimizer="adamw8bit", device="auto"))


def test_a_tensor_learning_rate_is_updated_in_place_and_trains_like_a_float_one():
    """torchao's AdamW8bit keeps each group's lr as a tensor and refuses a float in its place (the
    H200 suite's first lean rows failed so); the schedule must write into that tensor."""
    from training.trainer import lr_at

    cfg = TrainConfig(lr=1e-2, warmup_steps=4)
    states = []
    for tensor_lr in (False, True):
        model = build_model(ARGS, VOCAB, owned=[0, 3], seed=0)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = torch.tensor(cfg.lr) if tensor_lr else cfg.lr
        opt = torch.optim.AdamW(params, lr=lr, foreach=False)
        before = opt.param_groups[0]["lr"]
        train_steps(model, opt, batches(), cfg, 0, 3, 10, CPU)
        after = opt.param_groups[0]["lr"]
        if tensor_lr:
            assert after is before and float(after) == pytest.approx(lr_at(2, cfg, 10))
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-5, atol=1e-6, msg=k)
