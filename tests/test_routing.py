"""Balancing across nodes: the federation's load, the aux-loss-free routing bias, the global-share balancing loss."""

import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common import keys
from common.codec import encode
from common.spec import MergeSchedule, StrategyConfig
from model import MoEArgs, build_model
from model.balance import balance_loss
from model.loss import lm_loss
from model.routing import global_load, imbalance, router_bias, routers, set_router_bias, unflatten, update_bias
from strategy.spes import SpesStrategy

ARGS = MoEArgs(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2, expert_ffn=16)
VOCAB = 50


def test_global_load_is_the_token_weighted_mean_and_imbalance_is_max_over_mean():
    a = [[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]
    b = [[0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]]
    load = global_load([(a, 300.0), (b, 100.0)])
    assert load[0] == pytest.approx([0.55, 0.1, 0.1, 0.25], rel=1e-12)  # 0.75 * a + 0.25 * b, in float64
    assert load[1] == pytest.approx([0.25] * 4, rel=1e-12)
    assert global_load([(a, 1.0)])[0] == pytest.approx(a[0], rel=1e-12)  # one token is a report
    mean, worst = imbalance(load)
    assert worst == pytest.approx(0.55 / 0.25, rel=1e-12)  # in float64: a reported figure, kept exact
    assert mean == pytest.approx((0.55 / 0.25 + 1.0) / 2, rel=1e-12)
    assert global_load([(a, 0.0)]) is None


def test_bias_moves_toward_balance_by_the_rate():
    load = [[0.4, 0.3, 0.2, 0.1]]  # mean 0.25
    assert update_bias([[0.0] * 4], load, 0.01)[0] == pytest.approx([-0.01, -0.01, 0.01, 0.01])
    assert update_bias([[0.5, 0, 0, 0]], [[0.25] * 4], 0.01)[0] == pytest.approx([0.5, 0, 0, 0])


def test_the_bias_accumulates_steps_below_float32_resolution():
    # Thousands of rounds of small steps, kept in float64: a float32 bias would not even hold 0.1.
    assert update_bias([[0.1, 0.1]], [[0.6, 0.4]], 1e-9)[0] == [0.1 - 1e-9, 0.1 + 1e-9]


def test_unflatten_rebuilds_layers_by_experts_and_checks_what_came():
    t = unflatten([1, 2.5, 3, 4, 5, 6], layers=2, experts=3, what="global-expert-load")
    assert t.dtype == torch.float32 and torch.equal(t, torch.tensor([[1, 2.5, 3], [4, 5, 6]]))
    assert unflatten(None, 2, 3, "x") is None
    for bad, message in (
        ([1.0] * 5, "must be a list of 2 x 3 numbers"),
        ([1.0] * 5 + [True], "must hold numbers only"),
        ([1.0] * 5 + [math.nan], "holds NaN or Inf"),
        ([1.0] * 5 + [math.inf], "holds NaN or Inf"),
    ):
        with pytest.raises(ValueError, match=f"router-bias {message}"):
            unflatten(bad, 2, 3, "router-bias")


def test_with_bf16_router_logits_the_biased_choice_is_made_in_float32():
    """Under bf16 autocast the router's logits are bf16; the gate values are the float32 softmax,
    normalised over the picks, then rounded once to bf16."""
    model = build_model(ARGS, VOCAB, seed=0)
    gate = model.model.layers[0].mlp.gate.to(torch.bfloat16)
    bias = torch.zeros(2, 4)
    bias[0, 1] = 0.05
    set_router_bias(model, bias)
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    logits, scores, idx = gate(hidden)
    probs = torch.softmax(logits.float(), dim=-1)
    want_idx = (probs + bias[0]).topk(2, dim=-1).indices
    want = probs.gather(-1, want_idx)
    want = (want / want.sum(-1, keepdim=True)).to(torch.bfloat16)
    assert logits.dtype == scores.dtype == torch.bfloat16
    assert torch.equal(idx, want_idx) and torch.equal(scores, want)


def test_router_bias_changes_the_choice_not_the_gate_values_and_stays_out_of_the_state_dict():
    model = build_model(ARGS, VOCAB, seed=0).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    plain = model(ids, output_router_logits=True)
    set_router_bias(model, torch.zeros(2, 4))
    zero = model(ids, output_router_logits=True)
    assert torch.equal(plain.logits, zero.logits)  # a zero bias routes exactly as no bias

    gate = model.model.layers[0].mlp.gate
    seen = {}
    gate.register_forward_hook(lambda m, i, o: seen.update(scores=o[1], idx=o[2]))
    bias = torch.zeros(2, 4)
    bias[0, 3] = 10.0  # expert 3 of layer 0 is picked by every token
    set_router_bias(model, bias)
    biased = model(ids, output_router_logits=True)
    assert (seen["idx"] == 3).any(dim=-1).all()
    probs = torch.softmax(biased.router_logits[0].float(), dim=-1)
    want = probs.gather(-1, seen["idx"])
    want = want / want.sum(-1, keepdim=True)  # norm_topk_prob: gate values are the unbiased probabilities
    assert torch.allclose(seen["scores"].float(), want, atol=1e-6)
    assert not torch.equal(plain.logits, biased.logits)
    assert not any("selection_bias" in k for k in model.state_dict())
    # the counts the node reports are the picks the router really made
    parts = lm_loss(model, torch.randint(0, VOCAB, (2, 13)), 0.01, 0.001)
    assert parts.expert_counts[0, 3] == 2 * 12
    set_router_bias(model, None)
    assert router_bias(model) == [None, None]
    assert torch.equal(model(ids).logits, plain.logits)


def test_router_bias_is_kept_in_float32_whatever_it_came_as():
    model = build_model(ARGS, VOCAB, seed=0)
    assert router_bias(model) == [None, None]  # never biased: it routes plainly
    for bias in ([[0, 1, 0, 0], [0, 0, 2, 0]], torch.zeros(2, 4, dtype=torch.float64)):
        set_router_bias(model, bias)
        assert all(b.dtype == torch.float32 for b in router_bias(model))
    for bias in ([[0.0]], torch.zeros(0, 1)):
        with pytest.raises(ValueError, match="the model has 0 routers of 0 experts"):
            set_router_bias(torch.nn.Linear(2, 2), bias)
    # A node kept between rounds sets the bias every round: one hook per router, not one per round.
    for _ in range(3):
        set_router_bias(model, torch.zeros(2, 4))
    assert [len(gate._forward_hooks) for gate in routers(model)] == [1, 1]
    one_layer = build_model(MoEArgs(**{**ARGS.__dict__, "num_layers": 1}), VOCAB, seed=0)
    set_router_bias(one_layer, [[0.0, 0.5, 0.0, 0.0]])
    assert torch.equal(router_bias(one_layer)[0], torch.tensor([0.0, 0.5, 0.0, 0.0]))
    assert not any("selection_bias" in k for k in one_layer.state_dict())  # from the first call on


def test_router_bias_shape_and_values_checked():
    model = build_model(ARGS, VOCAB, seed=0)
    with pytest.raises(ValueError, match="shape"):
        set_router_bias(model, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        set_router_bias(model, torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="2 x 4"):
        unflatten([0.0] * 7, 2, 4, "bias")
    with pytest.raises(ValueError, match="numbers"):
        unflatten(["a"] * 8, 2, 4, "bias")
    assert unflatten(None, 2, 4, "bias") is None


def test_balance_loss_with_the_global_share_hand_computed():
    # 2 experts, top-1, every token has P = [0.75, 0.25] (logit gap ln 3) and picks expert 0.
    logits = [torch.tensor([[math.log(3.0), 0.0]] * 5)]
    local = balance_loss(logits, 2, 1)
    assert float(local) == pytest.approx(2 * (1.0 * 0.75 + 0.0 * 0.25))  # 1.5
    share = torch.tensor([[0.2, 0.8]])
    assert float(balance_loss(logits, 2, 1, global_load=share, global_weight=1.0)) == pytest.approx(
        2 * (0.2 * 0.75 + 0.8 * 0.25)
    )  # 0.7
    assert float(balance_loss(logits, 2, 1, global_load=share, global_weight=0.5)) == pytest.approx(
        2 * (0.6 * 0.75 + 0.4 * 0.25)
    )  # 1.1
    with pytest.raises(ValueError, match="per_layer"):
        balance_loss(logits, 2, 1, mode="pooled", global_load=share, global_weight=0.5)


def _reply(strategy, msg, load, tokens):
    pid = next(p for p, m in strategy.members.items() if m.node_id == msg.metadata.dst_node_id)
    update = {n: strategy.params[n] for n in strategy._expected_update(pid)}
    metrics = {keys.NUM_TOKENS: tokens, "train-loss": 1.0, keys.EXPERT_LOAD: [x for row in load for x in row]}
    return Message(RecordDict({keys.ARRAYS: encode(update), keys.METRICS: MetricRecord(metrics)}), reply_to=msg)


def test_coordinator_sends_the_federation_load_and_moves_the_bias(flower_task):
    model = build_model(ARGS, VOCAB, seed=0)
    cfg = StrategyConfig(local_steps=1, router_bias_rate=0.02, merge=MergeSchedule(enabled=False))
    strategy = SpesStrategy(cfg, 4, {10: 0, 11: 1}, num_rounds=3, num_layers=2)
    strategy.initialize(model.state_dict())
    first = list(strategy.configure_train(1, None, ConfigRecord({}), None))
    assert keys.GLOBAL_LOAD not in first[0].content[keys.CONFIG]  # nothing measured yet
    heavy = [[0.7, 0.1, 0.1, 0.1], [0.25] * 4]
    light = [[0.1, 0.1, 0.2, 0.6], [0.25] * 4]
    strategy.aggregate_train(1, [_reply(strategy, first[0], heavy, 300.0), _reply(strategy, first[1], light, 100.0)])
    record = strategy.history[-1]
    assert all(n["status"] == "ok" for n in record.nodes.values()), record.nodes
    assert record.expert_imbalance_max == pytest.approx(0.55 / 0.25)
    assert strategy.router_bias[0] == pytest.approx([-0.02, 0.02, 0.02, 0.02])  # global [0.55, 0.1, 0.125, 0.225]
    sent = list(strategy.configure_train(2, None, ConfigRecord({}), None))[1].content[keys.CONFIG]
    assert list(sent[keys.GLOBAL_LOAD])[:4] == pytest.approx([0.55, 0.1, 0.125, 0.225])
    assert list(sent[keys.ROUTER_BIAS])[:4] == pytest.approx([-0.02, 0.02, 0.02, 0.02])
    again = SpesStrategy(cfg, 4, {10: 0, 11: 1}, num_rounds=3, num_layers=2)
    again.load_state_dict(strategy.state_dict())
    assert again.router_bias == strategy.router_bias and again.global_load == strategy.global_load


def test_an_expert_is_starving_after_three_rounds_under_a_tenth_of_its_share():
    from strategy.federation_load import FederationLoad

    fed = FederationLoad(bias_rate=0.0)
    # 4 experts: the uniform share is 0.25, the bar 0.025. Layer 0 expert 3 gets 0.02, then 0.001 (both
    # under), layer 1 expert 0 gets 0.03 (over the bar).
    low = [[0.49, 0.3, 0.19, 0.02], [0.03, 0.32, 0.32, 0.33]]
    lower = [[0.5, 0.3, 0.199, 0.001], [0.03, 0.32, 0.32, 0.33]]
    seen = [fed.update([(load, 100.0)])["starving_experts"] for load in (low, lower, low)]
    assert seen == [[], [], [[0, 3]]]
    again = FederationLoad(bias_rate=0.0)
    again.load_state_dict(fed.state_dict())  # a resume keeps the count
    assert again.starving() == [[0, 3]]
    recovered = [[0.4, 0.3, 0.2, 0.1], [0.03, 0.32, 0.32, 0.33]]
    assert fed.update([(recovered, 100.0)])["starving_experts"] == []  # the run of low rounds ends
    assert fed.update([(lower, 100.0)])["starving_experts"] == []  # and starts again from one
