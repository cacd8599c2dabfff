"""Load-aware expert ownership (strategy.assignment_policy): the pure policies by hand, then the
strategy moving owners at the right round from fabricated node reports."""

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common import keys
from common.codec import encode
from common.spec import MergeSchedule, StrategyConfig
from model.naming import expert_param_names, shared_param_names
from strategy.assignment import Ownership, balance_by_load, balance_by_speed, cap_counts, speed_counts
from strategy.federation_load import BIAS_LIMIT_STEPS, FederationLoad, robust_load
from strategy.load_aware import SPEED_CLIP, mean_expert_load, mean_speed
from strategy.spes import SpesStrategy

L = 2


def _sums(owners, load):
    return {p: sum(load[e] for e in experts) for p, experts in owners.items()}


def _moved(before, after):
    return sum(len(set(after[p]) - set(before[p])) for p in before)


def _one_owner_each(owners, num_experts):
    Ownership(num_experts, tuple(owners[p] for p in sorted(owners))).validate()


# -- balance_by_load -------------------------------------------------------------------------
def test_load_one_swap_evens_two_nodes():
    load, owners = [0.4, 0.3, 0.2, 0.1], {0: (0, 1), 1: (2, 3)}  # sums 0.7 / 0.3
    new = balance_by_load(owners, load, 0.05)
    assert _sums(new, load) == pytest.approx({0: 0.5, 1: 0.5})
    assert _moved(owners, new) == 2  # one swap
    assert {p: len(e) for p, e in new.items()} == {0: 2, 1: 2}
    _one_owner_each(new, 4)


def test_load_already_even_moves_nothing():
    owners = {0: (0, 1), 1: (2, 3)}
    assert balance_by_load(owners, [0.4, 0.1, 0.3, 0.2], 0.05) == owners


def test_load_gain_below_tolerance_moves_nothing():
    # Sums 0.51 / 0.49; the best swap (1 <-> 2) evens them, a gain of 0.02 in spread.
    load, owners = [0.26, 0.25, 0.25, 0.24], {0: (0, 1), 1: (2, 3)}
    assert balance_by_load(owners, load, 0.05) == owners  # bar 0.05 x 0.5 = 0.025 > 0.02
    new = balance_by_load(owners, load, 0.01)  # bar 0.005 < 0.02
    assert _sums(new, load) == pytest.approx({0: 0.5, 1: 0.5}) and _moved(owners, new) == 2


def test_load_three_nodes_stops_at_best_reachable_spread():
    # Sums 0.5 / 0.3 / 0.2. Sums are multiples of 0.1 adding to 1, so 0.1 is the least spread;
    # one swap (expert 0 for expert 4) reaches it.
    load, owners = [0.3, 0.2, 0.2, 0.1, 0.1, 0.1], {0: (0, 1), 1: (2, 3), 2: (4, 5)}
    new = balance_by_load(owners, load, 0.05)
    sums = _sums(new, load)
    assert max(sums.values()) - min(sums.values()) == pytest.approx(0.1)
    assert _moved(owners, new) == 2 and new[1] == (2, 3)
    _one_owner_each(new, 6)


def test_load_one_heavy_expert_cannot_be_split():
    # Any swap just moves the 0.5 expert's surplus to another node: spread stays 0.4.
    owners = {0: (0, 1), 1: (2, 3), 2: (4, 5)}
    assert balance_by_load(owners, [0.5, 0.1, 0.1, 0.1, 0.1, 0.1], 0.0) == owners


def test_load_rejects_bad_input():
    with pytest.raises(ValueError, match="exactly once"):
        balance_by_load({0: (0, 1), 1: (1, 2)}, [0.25] * 4, 0.05)
    with pytest.raises(ValueError, match="tolerance"):
        balance_by_load({0: (0,), 1: (1,)}, [0.5, 0.5], -1.0)


# -- balance_by_speed ------------------------------------------------------------------------
def test_speed_counts_largest_remainder_at_least_one():
    assert speed_counts({0: 3.0, 1: 1.0}, 8) == {0: 6, 1: 2}
    assert speed_counts({0: 1.0, 1: 1.0, 2: 1.0}, 10) == {0: 4, 1: 3, 2: 3}
    assert speed_counts({0: 100.0, 1: 1.0, 2: 1.0}, 4) == {0: 2, 1: 1, 2: 1}  # quota 3.92, but each needs one


def test_speed_three_to_one_gives_six_and_two_with_two_moves():
    owners = {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    new = balance_by_speed(owners, {0: 300.0, 1: 100.0})
    assert new == {0: (0, 1, 2, 3, 6, 7), 1: (4, 5)}
    assert _moved(owners, new) == 2
    _one_owner_each(new, 8)


def test_speed_counts_within_one_of_quota_move_nothing():
    owners = {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    assert balance_by_speed(owners, {0: 110.0, 1: 100.0}) == owners  # quota 4.19 / 3.81
    uneven = {0: (0, 1, 2, 3), 1: (4, 5, 6), 2: (7, 8, 9)}
    assert balance_by_speed(uneven, {0: 1.0, 1: 1.0, 2: 1.0}) == uneven


def test_speed_needs_a_positive_speed_for_every_node():
    with pytest.raises(ValueError, match="every node"):
        balance_by_speed({0: (0,), 1: (1,)}, {0: 1.0})
    with pytest.raises(ValueError, match="> 0"):
        balance_by_speed({0: (0,), 1: (1,)}, {0: 1.0, 1: 0.0})


# -- combining the reports -------------------------------------------------------------------
def test_mean_expert_load_token_weighted_summed_over_layers():
    rounds = [
        {
            "0": {"status": "ok", "num_tokens": 100.0, "expert_load": [[0.75, 0.25], [0.5, 0.5]]},
            "1": {"status": "ok", "num_tokens": 300.0, "expert_load": [[0.25, 0.75], [0.5, 0.5]]},
            "2": {"status": "rejected: x", "num_tokens": 900.0, "expert_load": [[1.0, 0.0], [1.0, 0.0]]},
        }
    ]
    # (100 * [1.25, 0.75] + 300 * [0.75, 1.25]) / 400
    assert mean_expert_load(rounds, 2) == pytest.approx([0.875, 1.125])
    assert mean_expert_load([{"0": {"status": "ok", "num_tokens": 5.0}}], 2) is None


def test_mean_speed_is_the_median_rate_clipped_to_the_median_node():
    rounds = [
        {"0": {"status": "ok", "num_tokens": 100.0, "tokens_per_s": 50.0}},
        {
            "0": {"status": "ok", "num_tokens": 300.0, "tokens_per_s": 100.0},
            "1": {"status": "no reply"},
        },
        {"0": {"status": "ok", "num_tokens": 300.0, "tokens_per_s": 1e6}},  # one absurd round: the median ignores it
    ]
    assert mean_speed(rounds, [0, 1]) == pytest.approx({0: 100.0})
    liar = [{str(p): {"status": "ok", "num_tokens": 9.0, "tokens_per_s": 10.0} for p in range(3)}]
    liar[0]["3"] = {"status": "ok", "num_tokens": 9.0, "tokens_per_s": 1000.0}
    # medians 10, 10, 10, 1000 -> middle 10; the liar counts as SPEED_CLIP x 10
    assert mean_speed(liar, [0, 1, 2, 3]) == pytest.approx({0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0 * SPEED_CLIP})


def test_one_node_of_three_cannot_move_the_federation_load():
    honest = [[0.5, 0.3, 0.2]]
    reports = [(honest, 100.0), ([[0.5, 0.25, 0.25]], 100.0), ([[0.0, 0.0, 1.0]], 1e9)]
    # coordinate-wise median [0.5, 0.25, 0.25] sums to 1 already; the liar's tokens do not weigh
    assert robust_load(reports)[0] == pytest.approx([0.5, 0.25, 0.25])
    # two reports: the token-weighted mean (100 * [0.5, 0.3, 0.2] + 300 * [0.1, 0.1, 0.8]) / 400
    assert robust_load([(honest, 100.0), ([[0.1, 0.1, 0.8]], 300.0)])[0] == pytest.approx([0.2, 0.15, 0.65])
    # four reports: the midpoint of the middle two per expert
    four = [([[a, b, c]], 1.0) for a, b, c in [(0.5, 0.3, 0.2), (0.4, 0.2, 0.4), (0.5, 0.2, 0.3), (0.4, 0.3, 0.3)]]
    assert robust_load(four)[0] == pytest.approx([0.45, 0.25, 0.3])
    # medians [0.4, 0.4, 0.0] sum to 0.8: renormalised to shares
    three = [([row], 1.0) for row in ([0.6, 0.4, 0.0], [0.4, 0.6, 0.0], [0.0, 0.4, 0.6])]
    assert robust_load(three)[0] == pytest.approx([0.5, 0.5, 0.0])
    # NaN: an expert a node does not hold; one no reporting node holds has no load at all
    nan = float("nan")
    held = [([row], 1.0) for row in ([0.6, 0.4, nan], [0.4, 0.6, nan], [0.5, 0.5, nan])]
    assert robust_load(held)[0] == pytest.approx([0.5, 0.5, 0.0])
    assert robust_load([]) is None


def test_the_federation_load_of_nodes_that_hold_disjoint_experts_is_not_zero():
    """`mask` residency: each node routes only to the experts it holds, so every expert has one
    non-zero report and a median over all nodes is 0 everywhere. Absent experts are NaN in their
    node's report and left out: each expert's median is its holder's share, renormalised."""
    from strategy.residency import mark_absent

    shares = [(0.75, 0.25), (0.5, 0.5), (1.0, 0.0), (0.25, 0.75)]  # node i holds experts 2i and 2i + 1
    loads = [[[0.0] * 2 * i + list(pair) + [0.0] * (6 - 2 * i)] for i, pair in enumerate(shares)]
    held = [[2 * i, 2 * i + 1] for i in range(4)]
    assert robust_load([(load, 1.0) for load in loads])[0] == pytest.approx([0.0] * 8)  # the collapse
    marked = [(mark_absent(load, [[e for e in range(8) if e not in h]]), 1.0) for load, h in zip(loads, held)]
    # each expert's median is its one holder's share; they sum to 4 per layer, renormalised
    want = [0.1875, 0.0625, 0.125, 0.125, 0.25, 0.0, 0.0625, 0.1875]
    assert robust_load(marked)[0] == pytest.approx(want)
    # fewer reports than the median needs: the token-weighted mean, an absent expert counting 0
    assert robust_load(marked[:2])[0] == pytest.approx([0.375, 0.125, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0])


def test_the_router_bias_stays_within_its_limit():
    fed = FederationLoad(bias_rate=0.01)
    skewed = [([[0.9, 0.1]], 10.0)] * 3
    for _ in range(BIAS_LIMIT_STEPS + 20):
        fed.update(skewed)
    limit = BIAS_LIMIT_STEPS * 0.01
    assert fed.bias[0] == pytest.approx([-limit, limit])


def test_cap_counts_moves_each_node_at_most_the_cap_and_keeps_the_total():
    old = {0: 2, 1: 2, 2: 2, 3: 2}
    # clipped to 3, 1, 1, 1; the two missing go to the nodes furthest below their proposal, lowest id first
    assert cap_counts(old, {0: 5, 1: 1, 2: 1, 3: 1}, 1) == {0: 3, 1: 2, 2: 2, 3: 1}
    assert cap_counts(old, {0: 1, 1: 1, 2: 3, 3: 3}, 1) == {0: 1, 1: 1, 2: 3, 3: 3}
    assert cap_counts(old, {0: 5, 1: 1, 2: 1, 3: 1}, 3) == {0: 5, 1: 1, 2: 1, 3: 1}
    with pytest.raises(ValueError, match="same nodes and total"):
        cap_counts(old, {0: 8, 1: 1, 2: 1, 3: 1}, 1)


def test_a_decision_by_speed_moves_one_expert_per_node_at_most():
    owners = {0: (0, 1), 1: (2, 3), 2: (4, 5), 3: (6, 7)}
    uncapped = balance_by_speed(owners, {0: 10.0, 1: 1.0, 2: 1.0, 3: 1.0})
    capped = balance_by_speed(owners, {0: 10.0, 1: 1.0, 2: 1.0, 3: 1.0}, max_change=1)
    assert [len(uncapped[p]) for p in range(4)] == [5, 1, 1, 1]
    assert [len(capped[p]) for p in range(4)] == [3, 2, 2, 1]
    assert sorted(e for es in capped.values() for e in es) == list(range(8))


def test_a_decision_by_load_makes_one_swap_at_most():
    owners = {0: (0, 1, 2), 1: (3, 4, 5), 2: (6, 7, 8)}
    load = [9.0, 8.0, 7.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # node loads 24, 3, 0
    # uncapped: two swaps (0<->6, then 2<->3) even the nodes out at 9 each; capped: only the first
    assert balance_by_load(owners, load, 0.0) == {0: (1, 3, 6), 1: (2, 4, 5), 2: (0, 7, 8)}
    assert balance_by_load(owners, load, 0.0, max_swaps=1) == {0: (1, 2, 6), 1: (3, 4, 5), 2: (0, 7, 8)}
    assert balance_by_load(owners, load, 0.0, max_swaps=0) == owners


# -- the strategy ---------------------------------------------------------------------------
def _params(experts, hid=4, inter=3):
    g = torch.Generator().manual_seed(0)
    p = {
        "model.embed_tokens.weight": torch.randn(10, hid, generator=g),
        "model.norm.weight": torch.randn(hid, generator=g),
    }
    for layer in range(L):
        p[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(experts, hid, generator=g)
        for e in range(experts):
            base = f"model.layers.{layer}.mlp.experts.{e}"
            for proj, shape in (("gate_proj", (inter, hid)), ("up_proj", (inter, hid)), ("down_proj", (hid, inter))):
                p[f"{base}.{proj}.weight"] = torch.randn(*shape, generator=g)
    return p


def _round(s, rnd, arrays, per_layer_load, speed=None):
    """One round in which every node replies with a small update and reports `per_layer_load`."""
    msgs = list(s.configure_train(rnd, arrays, ConfigRecord({}), None))
    replies = []
    for msg in msgs:
        pid = next(p for p, m in s.members.items() if m.node_id == msg.metadata.dst_node_id)
        names = shared_param_names(s.params) + expert_param_names(s.params, msg.content["config"]["owned-experts"])
        metrics = {"num-tokens": 100.0, "expert-load": list(per_layer_load) * L}
        if speed:
            metrics["tokens-per-s"] = speed[pid]
        replies.append(
            Message(
                RecordDict(
                    {"arrays": encode({n: s.params[n] + 0.01 for n in names}), "metrics": MetricRecord(metrics)}
                ),
                reply_to=msg,
            )
        )
    s.aggregate_train(rnd, replies)
    return {m.metadata.dst_node_id: m.content["config"] for m in msgs}


def _strategy(policy, experts, nodes, every=2, **cfg):
    cfg = StrategyConfig(
        local_steps=5, merge=MergeSchedule(enabled=False), assignment_policy=policy, assignment_every=every, **cfg
    )
    return SpesStrategy(cfg, experts, {10 + p: p for p in range(nodes)}, num_rounds=5, num_layers=L)


SKEWED = [0.3, 0.2, 0.2, 0.1, 0.1, 0.1]  # per layer; node sums 0.5 / 0.3 / 0.2 (x2 layers)


def test_skewed_load_moves_owners_at_the_reconsideration_round(flower_task):
    s = _strategy("load", 6, 3, every=2)
    _round(s, 1, encode(_params(6)), SKEWED)
    assert s.owners == {0: (0, 1), 1: (2, 3), 2: (4, 5)} and s.events == []  # round 1: not a multiple of 2
    _round(s, 2, None, SKEWED)
    assert s.owners == {0: (1, 4), 1: (2, 3), 2: (0, 5)}
    assert s.history[-1].owners == {"0": [1, 4], "1": [2, 3], "2": [0, 5]}
    [event] = s.events
    assert (event["round"], event["event"], event["owners"]) == (2, "reassign", {"0": [1, 4], "2": [0, 5]})
    assert event["reason"].startswith("load-aware:") and event["load_spread"] == pytest.approx([0.6, 0.2])
    assert s.needs_full == {0: True, 1: False, 2: True}  # only the nodes whose experts changed
    sent = _round(s, 3, None, SKEWED)
    assert [list(sent[10 + p]["owned-experts"]) for p in range(3)] == [[1, 4], [2, 3], [0, 5]]
    assert [sent[10 + p]["full-model"] for p in range(3)] == [True, False, True]
    _round(s, 4, None, SKEWED)
    assert len(s.events) == 1  # already as even as swaps get: nothing more moves
    _one_owner_each(s.owners, 6)


def test_static_never_moves_owners(flower_task):
    s = _strategy("static", 6, 3, every=1)
    _round(s, 1, encode(_params(6)), SKEWED)
    for rnd in (2, 3):
        _round(s, rnd, None, SKEWED)
    assert s.owners == {0: (0, 1), 1: (2, 3), 2: (4, 5)} and s.events == []
    assert not any(s.needs_full.values())


def test_speed_policy_gives_the_faster_node_more_experts(flower_task):
    s = _strategy("speed", 8, 2, every=1)
    _round(s, 1, encode(_params(8)), [0.125] * 8, speed={0: 300.0123456, 1: 100.04})
    # 3x faster: quota 6 of 8 experts, but one decision moves at most one expert per node (4 -> 5)
    assert s.owners == {0: (0, 1, 2, 3, 7), 1: (4, 5, 6)}
    assert s.events[0]["owners"] == {"0": [0, 1, 2, 3, 7], "1": [4, 5, 6]}
    assert s.events[0]["tokens_per_s"] == {"0": 300.012, "1": 100.04}
    assert s.events[0]["reason"] == "load-aware: experts per node [4, 4] -> [5, 3] for tokens/s [300.0, 100.0]"
    assert s.needs_full == {0: True, 1: True}


def test_resume_keeps_the_measured_assignment(flower_task):
    s = _strategy("load", 6, 3, every=1)
    _round(s, 1, encode(_params(6)), SKEWED)
    moved = dict(s.owners)
    assert moved != {0: (0, 1), 1: (2, 3), 2: (4, 5)}
    t = _strategy("load", 6, 3, every=1)
    t.load_state_dict(s.state_dict(), s.outer_buffers())
    assert t.owners == moved and t.events == s.events  # no "resumed with different nodes" reassignment


def test_policy_needs_an_exclusive_assignment_and_a_known_name():
    with pytest.raises(ValueError, match="strategy.assignment=replicated"):
        StrategyConfig(assignment="replicated", assignment_policy="load").validate(8, 2)
    with pytest.raises(ValueError, match="strategy.assignment_policy must be one of"):
        StrategyConfig(assignment_policy="fastest").validate(8, 2)
    with pytest.raises(ValueError, match="strategy.assignment_every"):
        StrategyConfig(assignment_policy="load", assignment_every=0).validate(8, 2)
    with pytest.raises(ValueError, match="strategy.assignment_tolerance"):
        StrategyConfig(assignment_tolerance=float("nan")).validate(8, 2)
    StrategyConfig(assignment="replicated").validate(8, 2)  # static with replicated: fine


def test_config_keys_through_the_entry_point_config():
    from server_app.config import ConfigError, load

    spec = load(["strategy.assignment_policy=load", "strategy.assignment_every=3"])
    assert (spec.strategy.assignment_policy, spec.strategy.assignment_every, spec.strategy.assignment_tolerance) == (
        "load",
        3,
        0.05,
    )
    assert load(["strategy=diloco"]).strategy.assignment_policy == "static"
    with pytest.raises(ConfigError, match=r"assignment_policy=speed moves experts.*replicated"):
        load(["strategy=fedavg", "strategy.assignment_policy=speed"])


# -- boundaries of the rebalancing rules, by hand -------------------------------------------
def test_load_bar_is_a_share_of_the_mean_node_load_and_a_gain_equal_to_it_moves_nothing():
    owners = {0: (0, 1), 1: (2, 3)}
    # sums 3 and 4 (spread 1); swapping 0 <-> 2 evens them (gain 1); mean node load 3.5
    assert balance_by_load(owners, [1.0, 2.0, 1.5, 2.5], 0.2) == {0: (1, 2), 1: (0, 3)}  # bar 0.7 < 1
    assert balance_by_load(owners, [1.0, 2.0, 1.5, 2.5], 0.3) == owners  # bar 1.05 >= 1
    # sums 3 and 5 (spread 2); the best swap (0 <-> 2) leaves 1: gain 1; mean node load 4
    assert balance_by_load(owners, [1.0, 2.0, 1.5, 3.5], 0.25) == owners  # bar exactly 1: not more than it
    assert balance_by_load(owners, [1.0, 2.0, 1.5, 3.5], 0.24) == {0: (1, 2), 1: (0, 3)}
    with pytest.raises(ValueError, match="finite and >= 0"):
        balance_by_load(owners, [1.0, -0.5, 1.0, 1.0], 0.1)


def test_load_max_swaps_counts_each_swap_once():
    owners = {0: tuple(range(6)), 1: tuple(range(6, 12))}
    load = [2.0] * 6 + [0.0] * 6  # sums 12 / 0: three swaps of a 2 for a 0 even them (6 / 6)
    two = balance_by_load(owners, load, 0.0, max_swaps=2)
    assert two == {0: (2, 3, 4, 5, 6, 7), 1: (0, 1, 8, 9, 10, 11)}  # the first two of each side, in order
    assert balance_by_load(owners, load, 0.0) == {0: (3, 4, 5, 6, 7, 8), 1: (0, 1, 2, 9, 10, 11)}


def test_speed_counts_rounding_by_hand():
    assert speed_counts({0: 1.0, 1: 5.0}, 8) == {0: 1, 1: 7}  # quotas 1.33 / 6.67: the minimum is one, not more
    assert speed_counts({0: 2.0, 1: 1.5}, 6) == {0: 3, 1: 3}  # quotas 3.43 / 2.57: the larger remainder gets it
    assert speed_counts({0: 5.0, 1: 5.0, 2: 5.0}, 8) == {0: 3, 1: 3, 2: 2}  # 2.67 each: one more to each in turn
    # The minimum of one pushed the total over: take back from the node most over its quota.
    assert speed_counts({0: 0.5, 1: 0.5, 2: 5.0}, 3) == {0: 1, 1: 1, 2: 1}  # quotas 0.25 / 0.25 / 2.5
    assert speed_counts({0: 0.5, 1: 5.0, 2: 0.5, 3: 3.0}, 6) == {0: 1, 1: 3, 2: 1, 3: 1}  # 0.33/3.33/0.33/2
    assert speed_counts({0: 0.5, 1: 0.5, 2: 5.0, 3: 2.0}, 8) == {0: 1, 1: 1, 2: 4, 3: 2}  # tie 5-5, 2-2: lower id


def test_speed_within_one_of_quota_is_strict_and_counts_a_single_expert():
    kept = {0: (0, 2, 3), 1: (1,)}  # quotas 2.4 / 1.6: both within one, node 1 with its one expert
    assert balance_by_speed(kept, {0: 3.0, 1: 2.0}) == kept
    # quotas 3 / 1: node 0 is exactly one short, so counts follow the quotas
    assert balance_by_speed({0: (0, 2), 1: (1, 3)}, {0: 3.0, 1: 1.0}) == {0: (0, 2, 3), 1: (1,)}


def test_cap_counts_takes_a_clipped_surplus_back_from_the_nodes_furthest_over():
    # lo/hi 1-3, 2-6, 1-3: clipped 3, 2, 2 (one over); 0 and 2 are both at their proposal: lower id gives
    assert cap_counts({0: 1, 1: 4, 2: 1}, {0: 3, 1: 1, 2: 2}, 2) == {0: 2, 1: 2, 2: 2}
    # clipped 3, 7, 3 (two over): node 0 first (tie at 0 over its proposal), then node 1 (0 vs -1)
    assert cap_counts({0: 1, 1: 5, 2: 5}, {0: 3, 1: 7, 2: 1}, 2) == {0: 2, 1: 6, 2: 3}
    assert cap_counts({0: 1, 1: 1, 2: 5}, {0: 2, 1: 2, 2: 3}, 1) == {0: 1, 1: 2, 2: 4}  # node 2 is at its floor
    assert cap_counts({0: 4, 1: 1, 2: 2}, {0: 1, 1: 2, 2: 4}, 1) == {0: 3, 1: 1, 2: 3}  # 1 is further over than 2
    got = cap_counts({0: 2, 1: 5, 2: 1}, {0: 4, 1: 1, 2: 3}, 1)  # node 1 may not go under 4
    assert got == {0: 2, 1: 4, 2: 2}


def test_federation_load_state_keeps_the_bias_only_while_it_is_on():
    saved = {"global_load": [[0.5, 0.5]], "router_bias": [[0.01, -0.01]], "low_load_rounds": [[0, 1, 3]]}
    on, off = FederationLoad(bias_rate=0.01), FederationLoad(bias_rate=0.0)
    on.load_state_dict(saved)
    off.load_state_dict(saved)
    assert on.bias == [[0.01, -0.01]] and off.bias is None and on.low_rounds == {(0, 1): 3}
    older = FederationLoad(bias_rate=0.01)  # a state from before the starvation count
    older.load_state_dict({"global_load": None, "router_bias": None})
    assert older.low_rounds == {} and older.bias is None


def test_only_an_accepted_report_with_tokens_and_a_rate_counts():
    no_tokens = {"status": "ok", "expert_load": [[0.0, 1.0]]}  # a load without a token count weighs nothing
    rounds = [{"0": {"status": "ok", "num_tokens": 100.0, "expert_load": [[0.75, 0.25]]}, "1": no_tokens}]
    assert mean_expert_load(rounds, 2) == [0.75, 0.25]
    rounds = [
        {
            "0": {"status": "ok", "num_tokens": 1.0, "tokens_per_s": 0.5},  # slow, one token: still a measurement
            "1": {"status": "ok", "num_tokens": 10.0, "tokens_per_s": 0.0},
            "2": {"status": "ok", "tokens_per_s": 3.0},
            "3": {"status": "ok", "num_tokens": 10.0},
            "4": {"status": "rejected: x", "num_tokens": 10.0, "tokens_per_s": 2.0},
            "9": {"status": "ok", "num_tokens": 10.0, "tokens_per_s": 2.0},  # not one of the partitions asked about
        }
    ]
    assert mean_speed(rounds, [0, 1, 2, 3, 4]) == {0: 0.5}


def test_a_static_or_replicated_assignment_is_never_reconsidered():
    from strategy.load_aware import propose_owners

    active = {0: (0, 1), 1: (2, 3)}
    fast, slow = ({"status": "ok", "num_tokens": 9.0, "tokens_per_s": r} for r in (300.0, 100.0))
    window = [{"0": fast, "1": slow} for _ in range(2)]

    def cfg(**kw):
        return StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False), assignment_every=2, **kw)

    moved, _, extra = propose_owners(cfg(assignment_policy="speed"), 2, window, active, 4)  # the window moves one
    assert moved == {0: (0, 1, 3), 1: (2,)} and extra == {"tokens_per_s": {"0": 300.0, "1": 100.0}}
    assert propose_owners(cfg(assignment_policy="speed"), 3, window, active, 4) is None  # not a reconsideration round
    assert propose_owners(cfg(assignment_policy="static"), 2, window, active, 4) is None
    assert propose_owners(cfg(assignment_policy="speed", assignment="replicated"), 2, window, active, 4) is None


def test_a_load_decision_makes_one_swap_and_says_what_it_measured():
    from strategy.load_aware import propose_owners

    active = {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    row = [1 / 6] * 4 + [1 / 12] * 4  # per-node load 2/3 and 1/3: two swaps would even it, one is allowed
    window = [{"0": {"status": "ok", "num_tokens": 9.0, "expert_load": [row]}} for _ in range(3)]
    cfg = StrategyConfig(
        local_steps=10, merge=MergeSchedule(enabled=False), assignment_every=3, assignment_policy="load"
    )
    new, reason, extra = propose_owners(cfg, 3, window, active, 8)
    assert new == {0: (1, 2, 3, 4), 1: (0, 5, 6, 7)}  # the first 1/6 for the first 1/12: 7/12 and 5/12
    assert extra == {"load_spread": [0.333333, 0.166667]}  # 1/3 -> 1/6, to 6 decimals
    assert "over the last 3 round(s)" in reason


def test_the_load_decision_averages_exactly_the_rounds_since_the_last_one(flower_task):
    # every=3: round 3 decides on rounds 1-3. Round 1 is skewed (node sums 0.5 / 0.3 / 0.2 per layer),
    # rounds 2 and 3 uniform (1/3 each): the mean is 0.3889 / 0.3222 / 0.2889, a spread of
    # (0.3889 - 0.2889) x 2 layers = 0.2. Rounds 2-3 alone would show no spread and move nothing.
    s = _strategy("load", 6, 3, every=3)
    _round(s, 1, encode(_params(6)), SKEWED)
    _round(s, 2, None, [1 / 6] * 6)
    assert s.events == []
    _round(s, 3, None, [1 / 6] * 6)
    [event] = s.events
    assert event["round"] == 3 and event["load_spread"][0] == pytest.approx(0.2, abs=1e-6)


def test_a_later_load_decision_forgets_the_rounds_before_its_window(flower_task):
    # every=2: round 2 sees two uniform rounds (nothing moves); round 4 sees rounds 3 (skewed) and 4
    # (uniform): node sums (0.5 + 1/3) / 2, (0.3 + 1/3) / 2, (0.2 + 1/3) / 2, a spread of 0.15 x 2 = 0.3.
    s = _strategy("load", 6, 3, every=2)
    uniform = [1 / 6] * 6
    _round(s, 1, encode(_params(6)), uniform)
    _round(s, 2, None, uniform)
    _round(s, 3, None, SKEWED)
    assert s.events == []
    _round(s, 4, None, uniform)
    [event] = s.events
    assert event["round"] == 4 and event["load_spread"][0] == pytest.approx(0.3, abs=1e-6)


def test_a_measured_uneven_ownership_stays_between_decisions(flower_task):
    s = _strategy("speed", 8, 2, every=2)
    for rnd in (1, 2):
        _round(s, rnd, encode(_params(8)) if rnd == 1 else None, [0.125] * 8, speed={0: 300.0, 1: 100.0})
    assert s.owners == {0: (0, 1, 2, 3, 7), 1: (4, 5, 6)} and len(s.events) == 1
    _round(s, 3, None, [0.125] * 8, speed={0: 300.0, 1: 100.0})  # nobody left, joined or was dropped
    assert s.owners == {0: (0, 1, 2, 3, 7), 1: (4, 5, 6)} and len(s.events) == 1


def test_a_zero_token_report_is_not_a_vote_and_the_median_is_taken_in_float64():
    rows = ([[0.1, 0.2, 0.7]], [[0.3, 0.3, 0.4]], [[0.2, 0.25, 0.55]])
    median = robust_load([(r, 10.0) for r in rows])
    assert median[0] == pytest.approx([0.2, 0.25, 0.55], rel=1e-12, abs=0)  # float32 would be off by ~1e-8
    # The third report carries no tokens: two reports are left, so their token-weighted mean.
    mean = robust_load([(rows[0], 10.0), (rows[1], 30.0), (rows[2], 0.0)])
    assert mean[0] == pytest.approx([0.25, 0.275, 0.475], rel=1e-9)


def test_without_a_bias_rate_no_bias_is_kept_or_sent():
    fed = FederationLoad(bias_rate=0.0)
    fed.update([([[0.7, 0.1, 0.1, 0.1]], 10.0)])
    assert fed.bias is None and keys.ROUTER_BIAS not in fed.train_config() and fed.eval_config() == {}
