"""Partial residency in the model (issue 25): absent experts hold no memory, their picks are dropped
(or routed around) without NaN, and both expert implementations agree."""

import pytest
import torch

from model import MoEArgs, build_model, set_experts_implementation
from model.experts import PartitionedExperts, expert_modules, set_absent_experts
from model.naming import parse_expert_param
from model.routing import routers

ARGS = MoEArgs(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, expert_ffn=16)
VOCAB = 97
OWNED, ABSENT = [1, 4], [0, 3, 6, 7]  # resident: 1, 4 owned; 2, 5 frozen


def _model(absent=ABSENT, policy="skip"):
    model = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    set_absent_experts(model, absent, policy)
    return model


def test_an_absent_expert_has_no_parameter_no_storage_and_no_state():
    full, part = build_model(ARGS, VOCAB, owned=OWNED, seed=0), _model()
    per_expert = 3 * 32 * 16
    gone = ARGS.num_layers * len(ABSENT) * per_expert
    assert sum(p.numel() for p in part.parameters()) == sum(p.numel() for p in full.parameters()) - gone
    held = {parse_expert_param(n).expert for n in part.state_dict() if parse_expert_param(n)}
    assert held == {1, 2, 4, 5}
    for m in expert_modules(part):  # the two blocks hold the resident experts and nothing else
        owned, frozen = m._blocks["owned"], m._blocks["frozen"]
        assert owned[0].shape[0] == 2 and frozen[0].shape[0] == 2
        storages = {p.untyped_storage().data_ptr() for p in m.parameters()}
        assert storages == {t.untyped_storage().data_ptr() for t in (*owned, *frozen)}


def _picks():
    """Top-2 picks of 5 tokens over 8 experts: all resident, one absent, both absent (token 2)."""
    index = torch.tensor([[1, 2], [4, 0], [3, 7], [5, 6], [2, 4]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1]], requires_grad=True)
    return index, weights


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_absent_picks_are_dropped_and_the_rest_carry_the_tokens_weight(impl):
    torch.manual_seed(0)
    full = PartitionedExperts(8, 32, 16, "silu")
    part = PartitionedExperts(8, 32, 16, "silu")
    part.load_state_dict(full.state_dict())
    part.set_owned(OWNED)
    part.set_absent(ABSENT)
    part.implementation = full.implementation = impl
    x = torch.randn(5, 32)
    index, weights = _picks()
    y = part(x, index, weights)
    # By hand: token 1 keeps expert 4 at weight 1.0 (0.6 scaled to the token's total), token 2 has
    # no resident pick (zero), token 3 keeps expert 5 at 1.0; tokens 0 and 4 as they were.
    want = torch.stack(
        [
            0.7 * full[1](x[0]) + 0.3 * full[2](x[0]),
            1.0 * full[4](x[1]),
            torch.zeros(32),
            1.0 * full[5](x[3]),
            0.9 * full[2](x[4]) + 0.1 * full[4](x[4]),
        ]
    )
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert torch.isfinite(weights.grad).all() and weights.grad[2].eq(0).all()
    assert all(torch.isfinite(p.grad).all() for e in OWNED for p in part[e].parameters())


def test_mask_policy_routes_past_absent_experts_and_the_losses_still_see_every_expert():
    from model.loss import lm_loss

    model = _model(policy="mask")
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    out = model(input_ids=x, output_router_logits=True)
    assert all(t.shape[-1] == 8 for t in out.router_logits)  # logits over all experts
    chosen = [
        g(model.model.layers[i].post_attention_layernorm(torch.randn(7, 32)))[2] for i, g in enumerate(routers(model))
    ]
    assert all(not set(c.flatten().tolist()) & set(ABSENT) for c in chosen)
    loss = lm_loss(model, x, 0.01, 0.001)
    assert torch.isfinite(loss.total) and loss.aux > 0
    set_absent_experts(model, [], "skip")  # back to resident: no mask left
    assert all(getattr(g, "absent_experts", None) is None for g in routers(model))


def test_a_returning_expert_gets_storage_to_load_and_an_owned_one_cannot_be_absent():
    full = build_model(ARGS, VOCAB, owned=OWNED, seed=0)
    part = _model()
    set_absent_experts(part, [0, 3])  # 6 and 7 come back, uninitialised, frozen
    for m in expert_modules(part):
        assert m.resident == (1, 2, 4, 5, 6, 7) and m.frozen == (2, 5, 6, 7)
        assert not any(p.requires_grad for e in (6, 7) for p in m[e].parameters())
    missing, unexpected = part.load_state_dict(full.state_dict(), strict=False)
    assert not missing and {parse_expert_param(n).expert for n in unexpected} == {0, 3}
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"experts \[1\] cannot be absent"):
        set_absent_experts(part, [1])
    with pytest.raises(ValueError, match=r"owned experts \[0\] are absent"):
        expert_modules(part)[0].set_owned([0, 1])
    with pytest.raises(ValueError, match="policy must be one of"):
        set_absent_experts(part, [0], "drop")
    set_experts_implementation(part, "loop")
    assert torch.isfinite(part(input_ids=x).logits).all()


class _Vocab:
    """What a node's model needs of a tokenizer when the tokens are given: its size and ids."""

    eos_token_id = pad_token_id = 0

    def __len__(self) -> int:
        return VOCAB


def _node(tmp_path, *overrides):
    """A node of an 8-expert top-2 model given 8 blocks of 16 next tokens (scored 4 a batch)."""
    from client_app.local_round import NodeContext
    from common.spec import from_dict
    from server_app.config import compose

    model = ["model.hidden_size=32", "model.expert_ffn=16", "model.num_layers=2", "model.num_experts=8"]
    spec = from_dict(compose([*model, "model.top_k=2", "eval.batch_size=4", "eval.max_batches=2", *overrides]))
    blocks = torch.randint(1, VOCAB, (8, 17), generator=torch.Generator().manual_seed(5))
    return NodeContext(spec, _Vocab(), tmp_path / "node0", 0, 1, progress=False, blocks=(blocks, blocks))


def _loud_experts(spec):
    """The model's state with expert weights of std 1, not the init's 0.02: its loss then hangs on
    what the experts compute (at init a model scores about ln(vocab) whatever they hold)."""
    g = torch.Generator().manual_seed(6)
    state = build_model(spec.model, VOCAB, seed=0).state_dict()
    return {n: torch.randn(t.shape, generator=g) if parse_expert_param(n) else t for n, t in state.items()}


def test_a_node_scores_the_model_as_it_holds_it_routing_past_its_absent_experts(tmp_path):
    """Under the mask policy a node without some experts scores as the whole model does when its
    router is biased away from those experts: the same picks, the same weights."""
    from client_app.local_round import run_local_eval

    ctx = _node(tmp_path, "strategy.absent_policy=mask")
    spec = ctx.spec
    whole = _loud_experts(spec)
    absent = [[0, 3, 6], [2, 5]]  # per layer
    held = {n: t for n, t in whole.items() if (e := parse_expert_param(n)) is None or e.expert not in absent[e.layer]}
    away = torch.zeros(2, 8)
    for layer, row in enumerate(absent):
        away[layer, row] = -10.0  # router probabilities are in [0, 1]: never picked

    loss, tokens = run_local_eval(ctx, held, None, absent)
    want, want_tokens = run_local_eval(ctx, whole, router_bias=away)
    assert tokens == want_tokens == 2 * spec.eval.batch_size * 16
    assert loss == pytest.approx(want, rel=1e-5)
    assert abs(loss - run_local_eval(ctx, whole)[0]) > 1e-2  # the absent experts mattered


def test_a_node_training_in_bf16_scores_the_received_model_in_fp32(tmp_path):
    """bf16 is how a node trains (frozen experts stored in bf16 under autocast); its score of the
    received fp32 model is the fp32 model's, as the coordinator's evaluation would compute it."""
    from client_app.local_round import run_local_eval
    from training.trainer import evaluate

    ctx = _node(tmp_path, "train.precision=bf16")
    model = build_model(ctx.spec.model, VOCAB, seed=0)
    model.load_state_dict(_loud_experts(ctx.spec))
    loss, tokens = run_local_eval(ctx, model.state_dict())
    want, want_tokens = evaluate(model, ctx.blocks[1], 4, 2, torch.device("cpu"))
    assert tokens == want_tokens and loss == pytest.approx(want, rel=1e-6)


def test_a_node_trains_routing_with_the_bias_it_is_sent(tmp_path):
    """A bias of 10 on experts 6 and 7 (router probabilities are in [0, 1]) makes them every token's
    top 2 in training: the load the node reports is half on each, in both layers."""
    from client_app.local_round import RoundOrder, run_local_round
    from common import keys

    ctx = _node(tmp_path)
    bias = torch.zeros(2, 8)
    bias[:, [6, 7]] = 10.0
    whole = build_model(ctx.spec.model, VOCAB, seed=0).state_dict()
    order = RoundOrder([0, 1], True, 0, 1, router_bias=bias)
    _, metrics = run_local_round(ctx, whole, order, show_progress=False)
    assert metrics[keys.EXPERT_LOAD] == pytest.approx(([0.0] * 6 + [0.5, 0.5]) * 2)


def test_a_node_balances_with_the_federations_load_it_is_sent(tmp_path):
    """balance_global_weight = 1: f_i is the federation's load. A uniform one makes each layer's
    balancing loss E x sum_i (1/E) P_i = sum_i P_i = 1 whatever the router does; the node's own
    load (round 1: no federation load yet) gives another value."""
    from client_app.local_round import RoundOrder, run_local_round

    ctx = _node(tmp_path / "a", "train.balance_global_weight=1.0")
    whole = build_model(ctx.spec.model, VOCAB, seed=0).state_dict()
    order = RoundOrder([0, 1], True, 0, 1, global_load=torch.full((2, 8), 1 / 8))
    _, metrics = run_local_round(ctx, whole, order, show_progress=False)
    assert metrics["aux-loss"] == pytest.approx(1.0, abs=1e-6)
    alone = _node(tmp_path / "b", "train.balance_global_weight=1.0")
    _, metrics = run_local_round(alone, whole, RoundOrder([0, 1], True, 0, 1), show_progress=False)
    assert abs(metrics["aux-loss"] - 1.0) > 1e-4


def test_a_nodes_batch_order_follows_the_runs_seed(tmp_path):
    """The same blocks and model: the run's seed alone sets the order the node reads its blocks in
    (2 of 8 a step), so what it trains; the same seed trains the same."""
    from client_app.local_round import RoundOrder, run_local_round

    replies = []
    for i, seed in enumerate((0, 1, 0)):
        ctx = _node(tmp_path / str(i), f"seed={seed}", "train.batch_size=2")
        whole = build_model(ctx.spec.model, VOCAB, seed=0).state_dict()
        replies.append(run_local_round(ctx, whole, RoundOrder([0, 1], True, 0, 2), show_progress=False)[0])
    same = [all(torch.equal(a[n], b[n]) for n in a) for a, b in ((replies[0], replies[2]), (replies[0], replies[1]))]
    assert same == [True, False]
