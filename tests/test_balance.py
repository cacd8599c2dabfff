"""Load-balancing losses on hand-built router logits, against hand-computed values."""

import math

import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from model import MoEArgs, build_model
from model.balance import LocalDecay, balance_loss, count_scale, logit_z_loss, owned_experts
from model.loss import lm_loss
from training.trainer import TrainConfig, make_optimizer, train_steps

# The tiny preset's routing shape: 16 experts, top-2, 4 layers.
E, K, L, T = 16, 2, 4, 8
HIGH, SECOND = 30.0, 10.0  # softmax mass e^-20 ~ 2e-9 on the second pick, e^-30 on the rest


def collapsed(first: list[int], second: list[int]) -> tuple[torch.Tensor, ...]:
    """Every token of layer l puts ~all its probability on first[l]; its 2nd pick is second[l]."""
    layers = []
    for a, b in zip(first, second):
        logits = torch.zeros(T, E)
        logits[:, a], logits[:, b] = HIGH, SECOND
        layers.append(logits)
    return tuple(layers)


def balanced() -> tuple[torch.Tensor, ...]:
    """Token t picks experts 2t and 2t+1 with probability ~1/2 each: every expert once per layer."""
    logits = torch.zeros(T, E)
    for t in range(T):
        logits[t, 2 * t] = logits[t, 2 * t + 1] = HIGH
    return (logits,) * L


def test_layers_collapsing_on_different_experts_look_half_balanced_when_pooled():
    """The issue's example with the tiny preset's shape (E=16, k=2, 4 layers).

    Layer l sends all tokens to expert l (prob ~1) and, as 2nd pick, to expert 4+l (prob ~0).
    Per layer: f = 1/2 (half the picks) and P = 1 on expert l, f = 1/2, P ~ 0 on expert 4+l,
    so E * sum f P = 16 * 1/2 = 8 in every layer (balanced: 16 * 16 * (1/16 * 1/16) = 1).
    Pooled over the 4 layers: expert l holds f = 1/4 of the rows' picks and P = 1/4, for 4
    experts: 16 * 4 * (1/4 * 1/4) = 4.0, only twice the balanced pooled value (k = 2) although
    every layer has fully collapsed.
    """
    logits = collapsed(first=[0, 1, 2, 3], second=[4, 5, 6, 7])
    assert balance_loss(logits, E, K, "per_layer").item() == pytest.approx(8.0, abs=1e-6)
    assert balance_loss(logits, E, K, "pooled").item() == pytest.approx(4.0, abs=1e-6)
    # Collapsing on the *same* expert in every layer: pooled f = 1, P = 1 on it, 16 * 1 = 16;
    # per layer nothing changed (8). Pooled penalises which index collapsed, not the collapse.
    same = collapsed(first=[0] * L, second=[1] * L)
    assert balance_loss(same, E, K, "per_layer").item() == pytest.approx(8.0, abs=1e-6)
    assert balance_loss(same, E, K, "pooled").item() == pytest.approx(16.0, abs=1e-6)
    assert balance_loss(balanced(), E, K, "per_layer").item() == pytest.approx(1.0, abs=1e-6)
    assert balance_loss(balanced(), E, K, "pooled").item() == pytest.approx(2.0, abs=1e-6)


def test_pooled_is_transformers_load_balancing_loss():
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(37, E, generator=g) * 2 for _ in range(L))
    ours = balance_loss(logits, E, K, "pooled")
    torch.testing.assert_close(ours, load_balancing_loss_func(logits, E, K), rtol=1e-6, atol=1e-6)


def test_gradient_flows_through_router_probabilities():
    """d(sum f P)/d z_a = P_a (f_a - sum_i f_i P_i) > 0 for the over-used expert a (f_a = 1/2)."""
    logits = []
    for layer in range(L):
        z = torch.zeros(T, E)
        z[:, layer], z[:, 4 + layer] = 3.0, 1.0
        logits.append(z.requires_grad_(True))
    balance_loss(tuple(logits), E, K, "per_layer").backward()
    assert all(z.grad[:, layer].min() > 0 for layer, z in enumerate(logits))


def test_local_decay_factor_rises_in_500_step_stairs_over_first_fifth():
    decay = LocalDecay()  # 0.7 -> 1.0 over 20 % of training, every 500 steps
    total = 10_000  # ramp: 2000 steps
    assert decay.factor(0, total) == pytest.approx(0.7)
    assert decay.factor(499, total) == pytest.approx(0.7)
    assert decay.factor(500, total) == pytest.approx(0.7 + 0.3 * 500 / 2000)
    assert decay.factor(1999, total) == pytest.approx(0.7 + 0.3 * 1500 / 2000)
    assert decay.factor(2000, total) == pytest.approx(1.0)
    assert decay.factor(9000, total) == pytest.approx(1.0)


def test_local_decay_edges_and_its_checked_range():
    assert LocalDecay(warmup_fraction=0.0).factor(0, 100) == 1.0  # no ramp: full counts at once
    assert LocalDecay(every=1).factor(0, 5) == pytest.approx(0.7)  # a one-step ramp still starts at 0.7
    assert LocalDecay(every=1).factor(1, 5) == pytest.approx(1.0)
    for valid in (LocalDecay(start=1.0), LocalDecay(warmup_fraction=0.0), LocalDecay(warmup_fraction=1.0)):
        valid.validate()
    LocalDecay(every=1).validate()
    for bad, key in (
        (LocalDecay(start=0.0), "start"),
        (LocalDecay(start=1.5), "start"),
        (LocalDecay(warmup_fraction=1.5), "warmup_fraction"),
        (LocalDecay(warmup_fraction=-0.1), "warmup_fraction"),
        (LocalDecay(every=0), "every"),
    ):
        with pytest.raises(ValueError, match=f"balance_local_{key}"):
            bad.validate()


def test_count_scale_is_made_where_it_is_asked():
    scale = count_scale(4, [1], 0.5, device=torch.device("meta"))
    assert scale.device.type == "meta" and scale.shape == (4,)


def test_picks_are_counted_as_the_routing_bias_made_them():
    """Every token's router puts ~all probability on expert 0; a bias of 2 on expert 3 moves every
    pick there. f is the picks' share (all on 3), P the unbiased probabilities, so the loss is
    E * P_3 (tiny), not the collapsed E."""
    logits = torch.zeros(T, E)
    logits[:, 0] = HIGH
    bias = torch.zeros(E)
    bias[3] = 2.0
    p3 = torch.softmax(logits, dim=-1)[:, 3].mean()
    biased = balance_loss([logits], E, 1, "per_layer", bias=[bias])
    assert biased.item() == pytest.approx(E * p3.item(), rel=1e-5)
    assert balance_loss([logits], E, 1, "per_layer").item() == pytest.approx(E, rel=1e-5)


def test_the_federations_load_counts_only_with_a_weight():
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(4))
    load = torch.zeros(1, E)
    load[0, 5] = 1.0  # the federation sent every token to expert 5
    alone = balance_loss([logits], E, 2, "per_layer")
    assert balance_loss([logits], E, 2, "per_layer", global_load=load).item() == alone.item()
    p5 = torch.softmax(logits, dim=-1)[:, 5].mean()
    mixed = balance_loss([logits], E, 2, "per_layer", global_load=load, global_weight=1.0)
    assert mixed.item() == pytest.approx(E * p5.item(), rel=1e-6)  # f is the federation's load alone
    # Round 1: a weight but no load yet is the node's own f.
    assert balance_loss([logits], E, 2, "per_layer", global_weight=1.0).item() == alone.item()
    # The pooled loss has no per-layer shares: a load without a weight is ignored, a weight refused.
    pooled = balance_loss([logits], E, 2, "pooled")
    assert balance_loss([logits], E, 2, "pooled", global_load=load).item() == pooled.item()
    for given in (load, None):
        with pytest.raises(ValueError, match="needs train.balance=per_layer"):
            balance_loss([logits], E, 2, "pooled", global_load=given, global_weight=0.5)


def test_over_ranks_that_saw_the_same_tokens_the_loss_is_one_ranks():
    """`reduce` sums over the ranks that split one batch: two ranks with identical halves see f and P
    of the whole batch, which are those of either half."""
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(6))
    for mode in ("per_layer", "pooled"):
        alone = balance_loss([logits, logits.flip(0)], E, 2, mode)
        twice = balance_loss([logits, logits.flip(0)], E, 2, mode, reduce=lambda t: 2 * t)
        assert twice.item() == pytest.approx(alone.item(), rel=1e-6)
    summed = balance_loss([logits], E, 2, "per_layer", reduce=lambda t: t + 1)  # not a sum over ranks
    assert summed.item() != pytest.approx(balance_loss([logits], E, 2, "per_layer").item(), rel=1e-3)


def test_local_decay_scales_owned_counts():
    """Experts 0-3 owned at factor 0.7: each layer's collapsed expert has f = 0.7 * 1/2, loss 16 * 0.35 = 5.6."""
    logits = collapsed(first=[0, 1, 2, 3], second=[4, 5, 6, 7])
    scale = count_scale(E, owned=[0, 1, 2, 3], factor=0.7)
    assert balance_loss(logits, E, K, "per_layer", scale).item() == pytest.approx(5.6, abs=1e-6)
    # Owning experts 4-7 instead only scales the ~0-probability picks: no visible change.
    other = count_scale(E, owned=[4, 5, 6, 7], factor=0.7)
    assert balance_loss(logits, E, K, "per_layer", other).item() == pytest.approx(8.0, abs=1e-6)
    # A node owning every expert has nothing to steer toward.
    assert torch.equal(count_scale(E, range(E), 0.7), torch.ones(E))


def test_logit_z_loss_of_uniform_logits_is_squared_log_vocab():
    assert logit_z_loss(torch.zeros(3, 5, 50)).item() == pytest.approx(math.log(50) ** 2, rel=1e-6)


ARGS = MoEArgs(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, expert_ffn=16)
VOCAB = 61


def test_lm_loss_balance_modes_and_logit_z_on_a_model():
    model = build_model(ARGS, VOCAB, owned=[2, 3], seed=0).eval()
    block = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=block[:, :-1], output_router_logits=True)
        pooled = lm_loss(model, block, 0.01, 0.0, balance="pooled")
        per_layer = lm_loss(model, block, 0.01, 0.0, balance="per_layer", logit_z_weight=1e-2)
    torch.testing.assert_close(pooled.aux, load_balancing_loss_func(out.router_logits, 8, 2))
    torch.testing.assert_close(per_layer.aux, balance_loss(out.router_logits, 8, 2, "per_layer"))
    assert pooled.logit_z is None and per_layer.logit_z is not None
    torch.testing.assert_close(per_layer.logit_z, logit_z_loss(out.logits))
    torch.testing.assert_close(per_layer.total, per_layer.ce + 0.01 * per_layer.aux + 1e-2 * per_layer.logit_z)
    # Decayed balancing: the model's owned experts (2, 3) are scaled at step 0.
    decayed = lm_loss(
        model, block, 0.01, 0.0, local_decay=LocalDecay(), owned=owned_experts(model), step=0, total_steps=100
    )
    scale = count_scale(8, [2, 3], 0.7)
    torch.testing.assert_close(decayed.aux, balance_loss(out.router_logits, 8, 2, "per_layer", scale))


def test_trainer_runs_with_decayed_balancing_and_rejects_unknown_mode():
    assert owned_experts(build_model(ARGS, VOCAB, owned=[5, 1], seed=0)) == [1, 5]
    model = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    cfg = TrainConfig(warmup_steps=0, balance_local_decay=True, logit_z_loss_weight=1e-5)
    cfg.validate()
    g = torch.Generator().manual_seed(0)
    batches = iter(lambda: torch.randint(0, VOCAB, (2, 17), generator=g), None)
    m = train_steps(model, make_optimizer(model, cfg), batches, cfg, 0, 2, 10, torch.device("cpu"))
    assert math.isfinite(m["train-loss"]) and m["aux-loss"] > 0
    with pytest.raises(ValueError, match=r"train.balance must be one of \['per_layer', 'pooled'\], got 'global'"):
        TrainConfig(balance="global").validate()
    with pytest.raises(ValueError, match="train.balance_local_start must be in"):
        TrainConfig(balance_local_decay=True, balance_local_start=0.0).validate()


def test_the_trainer_trains_on_the_decayed_balancing_loss():
    """The aux loss of the trainer's first step is the decayed one (owned experts' counts x 0.7 at
    step 0), not the plain one."""
    import copy

    model = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    reference = copy.deepcopy(model)
    block = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(warmup_steps=0, balance_local_decay=True)
    m = train_steps(model, make_optimizer(model, cfg), iter([block]), cfg, 0, 1, 10, torch.device("cpu"))
    decay = cfg.local_decay()
    assert decay is not None and decay.factor(0, 10) == pytest.approx(0.7)
    want = lm_loss(reference, block, cfg.aux_loss_weight, 0.0, local_decay=decay, owned=[0, 1], step=0, total_steps=10)
    plain = lm_loss(reference, block, cfg.aux_loss_weight, 0.0)
    assert m["aux-loss"] == pytest.approx(float(want.aux), rel=1e-6)
    assert abs(float(want.aux) - float(plain.aux)) > 1e-3  # the two are told apart


def test_the_reported_expert_load_is_the_share_of_the_routers_actual_picks():
    """Counted independently: a hook on every router records the experts it picked in each of two
    training steps; the trainer's expert-load is, per layer, each expert's share of those picks."""
    from model.routing import routers

    model = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    picks = [torch.zeros(ARGS.num_experts) for _ in routers(model)]

    def record(layer):
        def hook(_module, _inputs, output):
            picks[layer].add_(torch.bincount(output[2].flatten(), minlength=len(picks[layer])))

        return hook

    for layer, router in enumerate(routers(model)):
        router.register_forward_hook(record(layer))
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randint(0, VOCAB, (2, 17), generator=g) for _ in range(2)]
    cfg = TrainConfig(warmup_steps=0)
    m = train_steps(model, make_optimizer(model, cfg), iter(blocks), cfg, 0, 2, 10, torch.device("cpu"))
    share = torch.stack([p / p.sum() for p in picks])
    assert share.min() < share.max()  # not trivially uniform
    torch.testing.assert_close(torch.tensor(m["expert-load"]).view_as(share), share.float(), rtol=0, atol=1e-6)
