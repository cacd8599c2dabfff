"""Robust by default: clipping against the round's median, coordinate-wise median, the guard's
acceptance test with leave-one-out, strikes and quarantine (pure logic and the strategy)."""

import math
import time

import pytest
import torch
from flwr.app import ConfigRecord

from common.codec import decode, encode
from common.spec import GuardConfig, MergeSchedule, StrategyConfig
from model.naming import expert_param_names, shared_param_names
from strategy import OuterOptimizer, SpesStrategy
from strategy.acceptance import accept_round
from strategy.aggregation import coordinate_median
from strategy.guard import MAD_TO_STD, screen, tolerance
from strategy.membership import Membership
from strategy.robust import clip_updates
from tests.test_strategy import E, reply, toy_params


# -- tolerance and leave-one-out ----------------------------------------------------------------
def test_tolerance_is_the_larger_of_the_floor_and_the_rounds_noise():
    losses = [5.0, 4.0, 3.5, 3.3, 3.2]  # changes -1, -0.5, -0.2, -0.1: median -0.35, MAD 0.2
    assert tolerance(losses, 0.02, 3.0, 8) == pytest.approx(3 * MAD_TO_STD * 0.2)
    assert tolerance(losses, 0.5, 3.0, 8) == pytest.approx(0.5 * 3.2)  # the floor wins
    assert tolerance([5.0, 4.0, 3.5], 0.02, 3.0, 8) == pytest.approx(0.07)  # two changes: no noise estimate yet
    # Only the last `window` changes count: -0.2, -0.1, 0.0 -> median -0.1, MAD 0.1.
    assert tolerance([*losses, 3.2], 0.0, 1.0, 3) == pytest.approx(MAD_TO_STD * 0.1)


def _losses(table):
    return lambda excluded: table[frozenset(excluded)]


def test_screen_excludes_the_node_whose_absence_restores_the_loss():
    table = {frozenset(): 10.0, **{frozenset({p}): 9.5 for p in (0, 1, 3)}, frozenset({2}): 4.0}
    v = screen(_losses(table), [0, 1, 2, 3], previous=4.1, tol=0.1, limit=1)
    assert not v.passed and v.excluded == [2] and v.loss == 4.0 and v.first_loss == 10.0
    assert v.evidence == {0: 9.5, 1: 9.5, 2: 4.0, 3: 9.5} and v.evaluations == 5
    assert v.bar == pytest.approx(4.2)


def test_screen_accepts_a_passing_round_with_one_evaluation():
    v = screen(_losses({frozenset(): 4.15}), [0, 1], previous=4.1, tol=0.1, limit=1)
    assert v.passed and v.excluded == [] and v.evaluations == 1 and v.loss == 4.15


def test_screen_keeps_a_rise_no_single_node_explains():
    table = {frozenset(): 5.0, **{frozenset({p}): 4.95 for p in range(4)}}
    v = screen(_losses(table), [0, 1, 2, 3], previous=4.0, tol=0.1, limit=1)
    assert v.excluded == [] and v.loss == 5.0 and not v.passed


def test_screen_removes_up_to_limit_nodes_and_treats_nan_as_worst():
    table = {
        frozenset(): math.nan,
        frozenset({0}): 8.0,
        frozenset({1}): math.nan,
        frozenset({2}): 9.0,
        frozenset({0, 2}): 4.0,
        frozenset({0, 1}): 8.0,
    }
    assert screen(_losses(table), [0, 1, 2], 4.0, 0.1, limit=1).excluded == [0]
    v = screen(_losses(table), [0, 1, 2], 4.0, 0.1, limit=2)
    assert v.excluded == [0, 2] and v.loss == 4.0 and v.first_loss == math.inf


def test_screen_boundaries_are_exact():
    # binary fractions, so the sums below are exact: previous 1.0 + tol 0.5 = bar 1.5
    at_bar = {frozenset(): 1.5, frozenset({0}): 0.25, frozenset({1}): 1.5}
    v = screen(_losses(at_bar), [0, 1], previous=1.0, tol=0.5, limit=1)
    assert v.passed and v.excluded == [] and v.evaluations == 1  # a loss at the bar passes: no search
    # Over the bar; without node 0 the loss is exactly tol lower: not more than tol, so nobody goes.
    rise = {frozenset(): 2.0, frozenset({0}): 1.5, frozenset({1}): 1.75}
    v = screen(_losses(rise), [0, 1], previous=1.0, tol=0.5, limit=1)
    assert v.excluded == [] and v.loss == 2.0 and v.evaluations == 3


def test_screen_suspects_already_out_are_skipped_and_a_tie_keeps_the_update():
    table = {
        frozenset(): 3.0,
        frozenset({0}): 1.0,
        frozenset({1}): 2.75,
        frozenset({2}): 2.5,
        frozenset({0, 1}): 0.5,
        frozenset({0, 1, 2}): 0.5,
    }
    t0 = time.perf_counter()
    v = screen(_losses(table), [0, 1, 2], previous=1.0, tol=0.25, limit=3, suspects=[0, 1, 2])
    elapsed = time.perf_counter() - t0
    # The search takes 0 out (3.0 -> 1.0, under the bar 1.25). Suspect 0 is out already; without
    # suspect 1 the loss is lower (0.5): out; without suspect 2 it is the same (0.5): it stays.
    assert v.excluded == [0, 1] and v.loss == 0.5 and v.first_loss == 3.0
    assert v.evidence == {0: 1.0, 1: 2.75, 2: 2.5}  # the first search's trials, not the suspects' later ones
    assert v.evaluations == 1 + 3 + 2
    assert 0 <= v.seconds <= elapsed
    assert v.summary() == {
        "loss": 0.5,
        "first_loss": 3.0,
        "bar": 1.25,
        "excluded": [0, 1],
        "evaluations": 6,
        "seconds": v.seconds,
    }


def test_screen_suspect_evidence_and_equal_loss():
    table = {frozenset(): 1.0, frozenset({1}): 1.0, frozenset({2}): 1.5}
    v = screen(_losses(table), [0, 1, 2], previous=1.0, tol=0.25, limit=2, suspects=[1, 2])
    # A passing round: each suspect scored once, and kept when the loss without it is no lower.
    assert v.excluded == [] and v.evaluations == 3 and v.evidence == {1: 1.0, 2: 1.5}


# -- clipping and the median ----------------------------------------------------------------------
def _shared_updates(norms):
    """Updates of one 2-entry shared tensor at zero, node p moving it by norms[p] along (3, 4) / 5."""
    params = {"model.norm.weight": torch.zeros(2)}
    direction = torch.tensor([0.6, 0.8])
    return params, {p: ({"model.norm.weight": n * direction}, 1.0) for p, n in enumerate(norms)}


def test_centered_clipping_bounds_a_node_by_the_median_update():
    params, updates = _shared_updates([1.0, 2.0, 100.0])
    out = clip_updates(params, updates, lambda n: {0, 1, 2}, 4.0, 4.0)
    assert out.clipped == {2: 1}  # median 2, bound 8
    assert torch.allclose(out.updates[2][0]["model.norm.weight"], torch.tensor([4.8, 6.4]))  # 8 along (0.6, 0.8)
    assert torch.equal(out.updates[0][0]["model.norm.weight"], updates[0][0]["model.norm.weight"])
    assert out.scale[2]["shared"] == pytest.approx(50.0) and out.scale[0]["shared"] == pytest.approx(0.5)


def test_clipping_pulls_the_change_back_not_the_value():
    """From a non-zero start the bound is on the change: clipped = old + bound x the change's direction."""
    params, updates = _shared_updates([1.0, 2.0, 100.0])
    old = torch.tensor([1.0, -1.0])
    params = {"model.norm.weight": old}
    moved = {p: ({"model.norm.weight": old + u["model.norm.weight"]}, w) for p, (u, w) in updates.items()}
    out = clip_updates(params, moved, lambda n: {0, 1, 2}, 4.0, 4.0)
    assert out.clipped == {2: 1}  # median change 2, bound 8
    assert torch.allclose(out.updates[2][0]["model.norm.weight"], torch.tensor([1.0 + 4.8, -1.0 + 6.4]))


def test_centered_clipping_needs_three_nodes_and_can_be_off():
    params, updates = _shared_updates([1.0, 100.0])
    assert clip_updates(params, updates, lambda n: {0, 1}, 4.0, 4.0).clipped == {}
    params, updates = _shared_updates([1.0, 2.0, 100.0])
    assert clip_updates(params, updates, lambda n: {0, 1, 2}, 0.0, 4.0).clipped == {}


def test_expert_clipped_against_its_layer_peers():
    params = {f"model.layers.0.mlp.experts.{e}.up_proj.weight": torch.zeros(1) for e in range(4)}
    updates = {
        0: ({f"model.layers.0.mlp.experts.{e}.up_proj.weight": torch.ones(1) for e in (0, 1)}, 1.0),
        1: (
            {
                "model.layers.0.mlp.experts.2.up_proj.weight": torch.full((1,), 3.0),
                "model.layers.0.mlp.experts.3.up_proj.weight": torch.full((1,), 50.0),
            },
            1.0,
        ),
    }

    def owner(name):
        return {0} if int(name.split(".")[5]) < 2 else {1}

    out = clip_updates(params, updates, owner, 4.0, 4.0)  # peers' norms 1, 1, 3, 50: median 2, bound 8
    assert out.clipped == {1: 1}
    assert out.updates[1][0]["model.layers.0.mlp.experts.3.up_proj.weight"].item() == pytest.approx(8.0)
    assert out.updates[1][0]["model.layers.0.mlp.experts.2.up_proj.weight"].item() == 3.0
    assert out.scale[1]["expert"] == pytest.approx(25.0)


def test_zero_start_tensor_is_bounded_without_a_norm_floor():
    """A LoRA B matrix starts at zero: honest changes pass, an outlier is clipped (no 1e-6 floor trap)."""
    params, updates = _shared_updates([1e-3, 2e-3, 1.5e-3])
    assert clip_updates(params, updates, lambda n: {0, 1, 2}, 4.0, 4.0).clipped == {}


def test_coordinate_median_odd_and_even():
    copies = [torch.tensor([1.0, 5.0]), torch.tensor([2.0, -1.0]), torch.tensor([100.0, 0.0])]
    assert torch.equal(coordinate_median(copies), torch.tensor([2.0, 0.0], dtype=torch.float64))
    copies.append(torch.tensor([3.0, 7.0]))
    assert torch.equal(coordinate_median(copies), torch.tensor([2.5, 2.5], dtype=torch.float64))
    copies.append(torch.tensor([-50.0, 6.0]))  # five: the third smallest, not the second
    assert torch.equal(coordinate_median(copies), torch.tensor([2.0, 5.0], dtype=torch.float64))


# -- the round's acceptance ---------------------------------------------------------------------
def _distance_to(target):
    return lambda params: float(sum(((params[n] - target[n]) ** 2).sum() for n in params))


def test_accept_round_drops_the_update_that_wrecks_the_guard_loss_and_keeps_momentum():
    params = {"w": torch.zeros(3)}
    target = {"w": torch.ones(3)}
    honest = [({"w": torch.full((3,), 0.5)}, 1.0) for _ in range(3)]
    updates = {0: honest[0], 1: honest[1], 2: honest[2], 3: ({"w": torch.full((3,), -40.0)}, 1.0)}
    cfg = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False), clip_shared=0.0)
    outer = OuterOptimizer(lr=0.7, momentum=0.9, nesterov=True)
    out = accept_round(params, updates, lambda n: {0, 1, 2, 3}, outer, cfg, 0, 1, (_distance_to(target), [3.0]))
    assert sorted(out.dropped) == [3] and not out.refused and out.step == 10
    # The applied result is the honest three's: mean 0.5, pseudo-gradient -0.5, Nesterov: -0.5 - 0.9 * 0.5.
    assert torch.allclose(out.params["w"], torch.full((3,), 0.7 * 0.95))
    assert torch.allclose(outer.buffers["w"], torch.full((3,), -0.5))  # only the accepted candidate's momentum
    assert out.verdict.evaluations == 5


def test_under_the_fragment_overlap_only_clipping_makes_a_suspect_not_disagreement():
    """The overlap's retained drifts sum to ~0 over the nodes: an honest update may point against the rest."""
    params = {"w": torch.zeros(2)}
    target = {"w": torch.tensor([1.0, -0.2])}
    moves = {0: [1.0, 0.2], 1: [1.0, -0.4], 2: [1.0, 0.0], 3: [-0.1, -1.0]}  # node 3: cosine < 0, honest size
    updates = {p: ({"w": torch.tensor(m)}, 1.0) for p, m in moves.items()}
    everyone = lambda n: {0, 1, 2, 3}  # noqa: E731

    def dropped(**extra):
        cfg = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False), **extra)
        out = accept_round(params, updates, everyone, OuterOptimizer(), cfg, 0, 1, (_distance_to(target), [10.0]))
        return sorted(out.dropped), out.cosine[3]

    # squared distance to the target of the mean of all four, (0.725, -0.3): 0.0856; without node 3, (1.0,
    # -0.0667): 0.0178, so a suspect is dropped (the round passes: bar 10.2). The others' sum is (3.0, -0.2).
    assert dropped() == ([3], pytest.approx((-0.3 + 0.2) / (math.hypot(0.1, 1.0) * math.hypot(3.0, 0.2))))
    assert dropped(fragments=2, fragment_overlap=2)[0] == []


def test_accept_round_refuses_below_quorum_after_the_guard():
    params = {"w": torch.zeros(3)}
    updates = {0: ({"w": torch.full((3,), 0.5)}, 1.0), 1: ({"w": torch.full((3,), -40.0)}, 1.0)}
    cfg = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False))
    out = accept_round(
        params, updates, lambda n: {0, 1}, OuterOptimizer(), cfg, 0, 2, (_distance_to({"w": torch.ones(3)}), [3.0])
    )
    assert out.params is None and out.refused == "1 update(s) after the guard, quorum 2" and list(out.dropped) == [1]
    assert out.step == 0 and out.alpha == 0.0


def test_accept_round_below_quorum_keeps_the_step_and_names_the_count():
    params = {"w": torch.zeros(3)}
    cfg = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False))
    out = accept_round(params, {0: ({"w": torch.ones(3)}, 1.0)}, lambda n: {0, 1}, OuterOptimizer(), cfg, 30, 2)
    assert (out.params, out.step, out.refused) == (None, 30, "1 valid update(s), quorum 2")


def test_accept_round_refuses_a_model_the_guard_cannot_score():
    params = {"w": torch.zeros(3)}
    updates = {p: ({"w": torch.full((3,), 0.1)}, 1.0) for p in range(3)}
    cfg = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False))
    guard = (lambda candidate: math.nan if candidate["w"].abs().sum() > 0 else 1.0, [1.0, 1.0])
    out = accept_round(params, updates, lambda n: {0, 1, 2}, OuterOptimizer(), cfg, 0, 1, guard)
    assert out.params is None and out.refused == "the guard loss of the new global model is not finite"


# -- strikes and quarantine ---------------------------------------------------------------------
def test_strikes_quarantine_for_good():
    m = Membership({7: 0, 11: 1})
    assert m.strike([1], 2) == [] and m.strike([1], 2) == [1]
    assert m.members[1].quarantined and m.strike([1], 2) == []
    with pytest.raises(ValueError, match="quarantined"):
        m.join(12, 1)
    restored = Membership({7: 0, 11: 1})
    restored.load_state_dict(m.state_dict())
    assert restored.members[1].quarantined and not restored.members[1].active and restored.members[1].strikes == 3


def _guarded_strategy(target, num_rounds=5, **guard):
    """Four nodes, the guard scoring the distance to `target` (where honest nodes step to, see _round)."""
    guard = GuardConfig(**{"strikes": 2, **guard})
    cfg = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False), guard=guard)
    s = SpesStrategy(cfg, E, {7: 0, 11: 1, 13: 2, 17: 3}, num_rounds=num_rounds)
    s.guard_score = _distance_to(target)
    s.target = target
    return s


def _round(s, rnd, arrays, attacker):
    msgs = list(s.configure_train(rnd, arrays, ConfigRecord({"run-token": "t"}), None))
    replies = []
    for msg in msgs:
        received = {**s.params, **decode(msg.content["arrays"])}
        owned = msg.content["config"]["owned-experts"]
        names = shared_param_names(received) + expert_param_names(received, owned)
        node = [p for p in s.partitions if s.members[p].node_id == msg.metadata.dst_node_id][0]
        step = -5.0 if node == attacker else 0.1
        replies.append(reply(msg, {n: received[n] + step * (s.target[n] - received[n]) for n in names}, 100))
    s.aggregate_train(rnd, replies)


def test_strategy_drops_then_quarantines_the_attacker_and_moves_its_experts(flower_task):
    params = toy_params(0)
    target = {n: torch.zeros_like(t) for n, t in params.items()}
    s = _guarded_strategy(target)
    _round(s, 1, encode(params), attacker=3)
    rec = s.history[-1]
    assert rec.nodes["3"]["status"].startswith("dropped by the guard") and rec.guard["excluded"] == [3]
    assert all(rec.nodes[str(p)]["status"] == "ok" for p in (0, 1, 2)) and rec.valid_updates == 3
    assert rec.nodes["3"]["clipped_tensors"] > 0
    assert rec.nodes["3"]["status"].endswith(", clipped, cosine -1.00 with the others")
    assert [rec.nodes[str(p)]["clipped_tensors"] for p in (0, 1, 2)] == [0, 0, 0]
    # Every update is a multiple of (target - model): 0.1 for the honest, -5 for the attacker. Each
    # one's sum of the others points the other way (0.3 against -5; -4.8 against 0.1): cosine -1.
    assert [rec.nodes[str(p)]["shared_update_cosine"] for p in range(4)] == [pytest.approx(-1.0)] * 4
    assert s.members[3].strikes == 1 and s.members[3].active
    _round(s, 2, None, attacker=3)
    assert s.members[3].quarantined and 3 not in s.partitions
    assert sorted(e for p in s.partitions for e in s.owners[p]) == list(range(E))
    # Two dropped updates are also two rounds without a valid one (reassign_after=2): it leaves, its
    # experts move, and it is quarantined for good (it may not come back).
    leave, reassign, quarantine = s.events
    assert leave == {"round": 2, "event": "leave", "partition": 3}
    assert reassign["reason"] == "partition(s) [3] without a valid update for 2 rounds"
    assert quarantine == {"round": 2, "event": "quarantine", "partition": 3} and s.members[3].quarantined
    loss_before = s.guard_losses[-1]
    _round(s, 3, None, attacker=None)
    assert s.history[-1].guard["excluded"] == [] and s.guard_losses[-1] < loss_before


def test_a_clipped_update_stays_only_if_the_loss_is_no_lower_without_it():
    table = {frozenset(): 4.0, frozenset({1}): 3.9, frozenset({2}): 4.05}
    v = screen(_losses(table), [0, 1, 2], previous=4.1, tol=0.1, limit=1, suspects=[1])
    assert v.passed and v.excluded == [1] and v.loss == 3.9 and v.evaluations == 2
    v = screen(_losses(table), [0, 1, 2], previous=4.1, tol=0.1, limit=1, suspects=[2])
    assert v.excluded == [] and v.loss == 4.0


def test_max_update_ratio_refuses_a_change_beyond_its_multiple_of_the_norm():
    from strategy.validation import InvalidUpdate, validate_update

    ref = {"w": torch.tensor([3.0, 4.0])}  # norm 5: at ratio 0.5 a change of up to 2.5 passes
    validate_update({"w": torch.tensor([4.5, 6.0])}, {"w"}, ref, max_update_ratio=0.5)  # change 2.5
    with pytest.raises(InvalidUpdate, match=r"w: change 3 exceeds 0.5 x its norm 5"):
        validate_update({"w": torch.tensor([4.8, 6.4])}, {"w"}, ref, max_update_ratio=0.5)
    validate_update({"w": torch.tensor([4.8, 6.4])}, {"w"}, ref, max_update_ratio=0.0)  # off


def test_a_refused_round_records_no_merge():
    names = [f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in (0, 1) for p in ("gate", "up", "down")]
    params = {n: torch.ones(2, 2) for n in names}
    updates = {0: ({n: torch.full((2, 2), math.nan if "0.up" in n else 2.0) for n in names}, 1.0)}
    cfg = StrategyConfig(local_steps=10, merge=MergeSchedule(interval=10, alpha_start=0.05, decay_steps=100, top_k=1))
    assert cfg.merge.due(0, 10)  # the round would merge, were it applied
    out = accept_round(params, updates, lambda n: {0}, OuterOptimizer(), cfg, 0, 1)
    assert out.refused.endswith("would hold NaN or Inf") and out.alpha == 0.0 and out.params is None


def test_the_guard_may_exclude_a_minority_of_the_round_at_most():
    from strategy.acceptance import _screen

    cfg = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False))
    candidate = lambda excluded: (frozenset(excluded), None)  # noqa: E731 - the "model" is who is left out
    guard = (lambda model: 10.0 - 3.0 * len(model), [1.0])  # every exclusion helps, none enough to pass
    for n, limit in ((2, 1), (3, 1), (4, 1), (5, 2), (7, 3)):
        v = _screen(candidate, guard, cfg, list(range(n)), [])
        assert len(v.excluded) == limit, (n, v.excluded)
    # A passing round still tests its clipped updates (suspects): one the loss is lower without goes.
    passing = (lambda model: 1.0 - 0.5 * (1 in model), [1.0])
    assert _screen(candidate, passing, cfg, [0, 1, 2], [1]).excluded == [1]


def test_reference_norms_by_hand():
    from strategy.robust import reference_norms

    def ex(layer, e, proj="up_proj"):
        return f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"

    params = {n: torch.zeros(1) for n in ["model.norm.weight", "attn", ex(1, 0)]}
    params |= {ex(0, e): torch.zeros(1) for e in range(4)} | {ex(0, e, "down_proj"): torch.zeros(1) for e in range(2)}
    params |= {ex(0, e, "gate_proj"): torch.zeros(1) for e in range(3)}
    owner = {ex(0, 0): 0, ex(0, 1): 0, ex(0, 2): 1, ex(0, 3): 2, ex(0, 0, "down_proj"): 0, ex(0, 1, "down_proj"): 1}
    owner |= {ex(0, e, "gate_proj"): e for e in range(3)}
    trainers = {"model.norm.weight": {0, 1, 2}, ex(1, 0): {0, 1, 2}, "attn": {0, 1}}
    trainers |= {n: {p} for n, p in owner.items()}
    moved = {  # each node's change of each tensor it trains
        "model.norm.weight": [1.0, 2.0, 10.0],
        ex(1, 0): [2.0, -4.0, 6.0],
        "attn": [1.0, 9.0],
        ex(0, 0): [1.0],
        ex(0, 1): [3.0],
        ex(0, 2): [5.0],
        ex(0, 3): [-7.0],
        ex(0, 0, "down_proj"): [1.0],
        ex(0, 1, "down_proj"): [100.0],
        ex(0, 0, "gate_proj"): [1.0],
        ex(0, 1, "gate_proj"): [2.0],
        ex(0, 2, "gate_proj"): [30.0],
    }
    updates = {p: ({}, 1.0) for p in range(3)}
    for name, changes in moved.items():
        for p, c in zip(sorted(trainers[name]), changes, strict=True):
            updates[p][0][name] = torch.tensor([c])
    refs = reference_norms(params, updates, lambda n: trainers[n])
    want = {(p, "model.norm.weight"): ("shared", 2.0) for p in range(3)}  # median of 1, 2, 10
    want |= {(p, ex(1, 0)): ("expert", 4.0) for p in range(3)}  # every node trains it: median of 2, 4, 6
    want |= {(owner[ex(0, e)], ex(0, e)): ("expert", 4.0) for e in range(4)}  # its peers: median of 1, 3, 5, 7
    want |= {(e, ex(0, e, "gate_proj")): ("expert", 2.0) for e in range(3)}  # three peers are enough: median 2
    assert refs == want  # two holders of attn, two down_proj peers: no reference


def test_agreement_is_the_cosine_with_the_sum_of_the_others_over_the_shared_tensors():
    from strategy.robust import Clipping, agreement

    # the one-trainer tensor first (it is passed over, the rest still counts); changes from a non-zero start
    params = {"expert": torch.zeros(1), "a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    d = {  # per node: change of a, change of b
        0: ([1.0, 0.0], [2.0]),
        1: ([1.0, 1.0], [-1.0]),
        2: ([0.0, 1.0], [0.0]),
    }
    updates = {
        p: ({"a": params["a"] + torch.tensor(a), "b": params["b"] + torch.tensor(b)}, 1.0) for p, (a, b) in d.items()
    }
    updates[0][0]["expert"] = torch.tensor([-50.0])  # one trainer: not a shared tensor, not counted
    trainers = lambda n: {0} if n == "expert" else {0, 1, 2}  # noqa: E731
    cos = agreement(params, updates, trainers)
    # node 0: a (1,0).(1,2) = 1, b 2 x -1 = -2 -> dot -1; |own|^2 = 1 + 4; |rest|^2 = 5 + 1
    # node 1: a (1,1).(1,1) = 2, b -1 x 2 = -2 -> dot 0
    # node 2: a (0,1).(2,1) = 1, b 0 -> dot 1; |own|^2 = 1; |rest|^2 = 5 + 1
    assert cos == pytest.approx({0: -1 / math.sqrt(30), 1: 0.0, 2: 1 / math.sqrt(6)})
    # a node whose rest is zero (the others cancel out) agrees by definition
    flip = {0: ({"a": torch.tensor([3.0, 4.0])}, 1.0), 1: ({"a": torch.tensor([-3.0, -4.0])}, 1.0)}
    flip[2] = ({"a": torch.tensor([3.0, 4.0])}, 1.0)
    assert agreement({"a": torch.zeros(2)}, flip, lambda n: {0, 1, 2}) == pytest.approx({0: 1.0, 1: -1.0, 2: 1.0})
    assert Clipping({}, clipped={3: 1}, cosine={0: 0.5, 1: -0.1, 2: 0.0}).suspects == [1, 3]


def test_the_guards_candidates_aggregate_as_the_round_is_configured():
    from strategy.acceptance import _candidates

    params = {"w": torch.zeros(1)}
    updates = {p: ({"w": torch.tensor([v])}, 1.0) for p, v in enumerate([0.0, 1.0, 2.0, 100.0])}
    everyone = lambda n: {0, 1, 2, 3}  # noqa: E731

    def without(excluded, **cfg):
        c = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False), **cfg)
        return _candidates(params, updates, everyone, OuterOptimizer(), c, 0.0)(frozenset(excluded))[0]["w"].item()

    assert without([]) == 25.75  # the plain mean of 0, 1, 2, 100
    assert without([], trim_fraction=0.25) == 1.5  # one off each end: mean of 1, 2
    assert without([], median=True) == 1.5  # the middle two's midpoint
    assert without([3], median=True) == 1.0 and without([3]) == 1.0  # without the outlier


def test_clipping_keeps_the_agreement_and_bounds_a_change_where_the_others_made_none():
    params = {"attn": torch.zeros(1), "w": torch.zeros(2)}
    # attn has two holders (no reference) and comes first in each update; w: two nodes left it alone
    updates = {p: ({"attn": torch.ones(1), "w": torch.zeros(2)}, 1.0) for p in (0, 1)}
    updates[2] = ({"attn": torch.ones(1), "w": torch.tensor([0.3, 0.4])}, 1.0)  # a change of norm 0.5
    trainers = lambda n: {0, 1} if n == "attn" else {0, 1, 2}  # noqa: E731
    out = clip_updates(params, updates, trainers, 4.0, 4.0)
    # median change 0: any change is infinitely many medians, clipped back to the old value
    assert out.clipped == {2: 1} and torch.equal(out.updates[2][0]["w"], torch.zeros(2))
    assert out.scale[2]["shared"] == math.inf and out.scale[0]["shared"] == 1.0
    assert torch.equal(out.updates[2][0]["attn"], torch.ones(1))
    # a sign flip is no larger than the others: not clipped, but named for the guard by its cosine
    flip = {p: ({"w": torch.tensor([1.0, 1.0])}, 1.0) for p in (0, 1)}
    flip[2] = ({"w": torch.tensor([-1.0, -1.0])}, 1.0)
    out = clip_updates({"w": torch.zeros(2)}, flip, lambda n: {0, 1, 2}, 4.0, 4.0)
    # nodes 0 and 1: the others sum to zero (agree by definition); node 2 against (2, 2): -1
    assert out.clipped == {} and out.cosine == pytest.approx({0: 1.0, 1: 1.0, 2: -1.0}) and out.suspects == [2]


def test_an_expert_exactly_at_the_starving_bar_is_not_counted_low():
    from strategy.federation_load import STARVING_SHARE, FederationLoad

    fed = FederationLoad(bias_rate=0.0)
    bar = STARVING_SHARE / 4
    fed._count_low([[bar, bar / 2, 0.5, 0.5 - 1.5 * bar]])
    assert fed.low_rounds == {(0, 1): 1}


def test_clipping_counts_each_clipped_tensor_and_reports_the_largest_ratio_per_kind():
    params = {"u": torch.zeros(1), "v": torch.zeros(1), "x": torch.zeros(1)}
    changes = {"u": [1.0, 2.0, 40.0], "v": [1.0, 2.0, 20.0], "x": [1.0, 2.0, 8.0]}  # medians 2
    updates = {p: ({n: torch.tensor([c[p]]) for n, c in changes.items()}, 1.0) for p in range(3)}
    out = clip_updates(params, updates, lambda n: {0, 1, 2}, 4.0, 4.0)
    # node 2: u at 20 medians and v at 10 clipped to 4 x 2; x at exactly 4 medians is within the bound
    assert out.clipped == {2: 2} and out.scale[2]["shared"] == 20.0
    assert [out.updates[2][0][n].item() for n in ("u", "v", "x")] == [8.0, 8.0, 8.0]


def test_the_guard_keeps_the_losses_of_the_last_window_plus_one_accepted_models(flower_task):
    params = toy_params(0)
    target = {n: torch.zeros_like(t) for n, t in params.items()}
    s = _guarded_strategy(target, num_rounds=6, window=3)
    scores = [s.guard_score(params)]  # the model the run starts from
    for rnd in range(1, 6):
        _round(s, rnd, encode(params) if rnd == 1 else None, attacker=None)
        scores.append(s.guard_score(s.params))  # every node steps a tenth of the way to the target
    assert s.guard_losses == pytest.approx(scores[-4:], rel=1e-9)  # window 3: three changes, four losses


def test_one_strike_quarantines_at_the_first_dropped_update(flower_task):
    params = toy_params(0)
    target = {n: torch.zeros_like(t) for n, t in params.items()}
    s = _guarded_strategy(target, strikes=1)
    _round(s, 1, encode(params), attacker=3)
    quarantine, reassign = s.events
    assert quarantine == {"round": 1, "event": "quarantine", "partition": 3}
    assert reassign["reason"] == "partition(s) [3] quarantined by the guard" and 3 not in s.partitions
