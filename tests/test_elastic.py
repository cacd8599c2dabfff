"""Elastic ownership: nodes that leave lose their experts to the others; nodes that join get a share."""

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common.codec import decode, encode
from common.spec import MergeSchedule, StrategyConfig
from faults.cases import _task_identity, _toy_params
from model.naming import expert_param_names, shared_param_names
from strategy.assignment import rebalance
from strategy.spes import SpesStrategy

E = 4


def test_rebalance_moves_only_orphans_then_evens_out():
    # Partition 1 left: its experts 2, 3 go to the survivors, lowest count first.
    assert rebalance({0: (0, 1), 1: (2, 3), 2: ()}, [0, 2], 4) == {0: (0, 1), 2: (2, 3)}
    # A newcomer takes experts from the busiest nodes until counts differ by at most one.
    new = rebalance({0: (0, 1, 2, 3, 4, 5), 1: (6, 7, 8, 9, 10, 11)}, [0, 1, 2], 12)
    assert sorted(len(v) for v in new.values()) == [4, 4, 4]
    assert set(new[0]) <= {0, 1, 2, 3, 4, 5} and set(new[1]) <= set(range(6, 12))
    assert sorted(e for v in new.values() for e in v) == list(range(12))
    assert rebalance({0: (0, 1)}, [0, 3], 2, "replicated") == {0: (0, 1), 3: (0, 1)}


def _round(strategy, rnd, arrays, replying):
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), None))
    replies = []
    for msg in msgs:
        pid = next(p for p, m in strategy.members.items() if m.node_id == msg.metadata.dst_node_id)
        if pid not in replying:
            continue
        got = decode(msg.content["arrays"])
        names = shared_param_names(strategy.params) + expert_param_names(
            strategy.params, msg.content["config"]["owned-experts"]
        )
        update = {n: strategy.params[n] + 0.01 for n in names}
        replies.append(
            Message(RecordDict({"arrays": encode(update), "metrics": MetricRecord({"num-tokens": 10.0})}), reply_to=msg)
        )
        assert set(got) <= set(strategy.params)
    strategy.aggregate_train(rnd, replies)
    return msgs


def test_absent_node_loses_experts_after_k_rounds_and_every_expert_has_a_live_owner(flower_task):
    _task_identity()
    cfg = StrategyConfig(local_steps=5, merge=MergeSchedule(enabled=False), reassign_after=2, min_nodes=1)
    s = SpesStrategy(cfg, E, {10: 0, 11: 1}, num_rounds=5, num_layers=2)
    _round(s, 1, encode(_toy_params(0)), replying={0, 1})
    assert s.owners == {0: (0, 1), 1: (2, 3)}
    _round(s, 2, None, replying={0})
    assert s.partitions == [0, 1] and s.members[1].absent == 1  # one missed round: still a member
    expert_2_before = s.params["model.layers.0.mlp.experts.2.up_proj.weight"].clone()
    _round(s, 3, None, replying={0})
    assert s.partitions == [0] and s.owners == {0: (0, 1, 2, 3)}
    # The missing node's experts kept their last synced value while nobody trained them.
    assert s.params["model.layers.0.mlp.experts.2.up_proj.weight"].equal(expert_2_before)
    msgs = _round(s, 4, None, replying={0})
    assert [list(m.content["config"]["owned-experts"]) for m in msgs] == [[0, 1, 2, 3]]
    assert msgs[0].content["config"]["full-model"]  # its ownership changed: it gets everything
    leave, reassign = s.events
    assert leave == {"round": 3, "event": "leave", "partition": 1}
    assert reassign["reason"] == "partition(s) [1] without a valid update for 2 rounds"


def test_a_leave_is_recorded_after_the_events_before_it(flower_task):
    _task_identity()
    cfg = StrategyConfig(local_steps=5, merge=MergeSchedule(enabled=False), reassign_after=1)
    s = SpesStrategy(cfg, E, {10: 0, 11: 1}, num_rounds=5, num_layers=2)
    s.add_node(12, 2)
    _round(s, 1, encode(_toy_params(0)), replying={0, 1})  # the newcomer never answers
    assert [(e["round"], e["event"]) for e in s.events] == [(0, "join"), (0, "reassign"), (1, "leave"), (1, "reassign")]


def test_a_federation_where_nobody_answers_keeps_its_members(flower_task):
    _task_identity()
    cfg = StrategyConfig(local_steps=5, merge=MergeSchedule(enabled=False), reassign_after=2)
    s = SpesStrategy(cfg, E, {10: 0, 11: 1}, num_rounds=5, num_layers=2)
    _round(s, 1, encode(_toy_params(0)), replying={0, 1})
    for rnd in (2, 3, 4):
        _round(s, rnd, None, replying=set())  # a network outage: nobody to hand the experts to
    assert s.partitions == [0, 1] and s.owners == {0: (0, 1), 1: (2, 3)} and s.events == []
    assert s.failed_rounds == 3


def test_replicated_experts_are_resent_every_round(flower_task):
    # Every node trains every expert: its copy of them is never the global value after averaging.
    _task_identity()
    cfg = StrategyConfig(local_steps=5, merge=MergeSchedule(enabled=False), assignment="replicated")
    s = SpesStrategy(cfg, E, {10: 0, 11: 1}, num_rounds=5, num_layers=2)
    _round(s, 1, encode(_toy_params(0)), replying={0, 1})
    msgs = _round(s, 2, None, replying={0, 1})
    assert all(m.content["config"]["full-model"] and set(decode(m.content["arrays"])) == set(s.params) for m in msgs)


def test_joining_node_gets_full_model_and_a_share(flower_task):
    _task_identity()
    cfg = StrategyConfig(local_steps=5, merge=MergeSchedule(enabled=False))
    s = SpesStrategy(cfg, E, {10: 0, 11: 1}, num_rounds=5, num_layers=2)
    _round(s, 1, encode(_toy_params(0)), replying={0, 1})
    s.add_node(12, 2)
    msgs = _round(s, 2, None, replying={0, 1, 2})
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    assert by_node[12].content["config"]["full-model"]
    assert set(decode(by_node[12].content["arrays"])) == set(s.params)
    assert sorted(len(v) for v in s.owners.values()) == [1, 1, 2]
    assert sorted(e for v in s.owners.values() for e in v) == list(range(E))
    state = s.state_dict()
    assert state["members"]["2"]["active"]
    join, reassign = state["events"]
    assert join == {"round": 1, "event": "join", "partition": 2}
    assert (reassign["event"], reassign["reason"]) == ("reassign", "partition 2 joined")


def test_a_node_joining_a_replicated_run_trains_every_expert(flower_task):
    _task_identity()
    cfg = StrategyConfig(local_steps=5, merge=MergeSchedule(enabled=False), assignment="replicated")
    s = SpesStrategy(cfg, E, {10: 0, 11: 1}, num_rounds=5, num_layers=2)
    s.add_node(12, 2)  # before the first round: its events carry round 0
    _round(s, 1, encode(_toy_params(0)), replying={0, 1, 2})
    s.add_node(13, 3)
    assert s.owners == {p: tuple(range(E)) for p in (0, 1, 2, 3)}
    assert [(e["round"], e["event"]) for e in s.events] == [(0, "join"), (0, "reassign"), (1, "join"), (1, "reassign")]


def test_rebalance_drops_unknown_experts_and_gives_orphans_to_the_fewest_first():
    # Expert 4 does not exist in a 4-expert model: dropped; the missing 2 and 3 go to node 0.
    assert rebalance({0: (0, 1, 4)}, [0], 4) == {0: (0, 1, 2, 3)}
    # Partition 1 left and 2 joined with nothing: orphan 0 goes to the node owning fewest (2, none),
    # then orphan 2 to the lowest id among the tied (0 and 2 own one each).
    assert rebalance({0: (1,), 1: (0, 2)}, [0, 2], 3) == {0: (1, 2), 2: (0,)}
    # Evening out takes from the busiest node, lowest id first among the tied (0 before 1).
    assert rebalance({0: (0, 1, 2), 1: (3, 4, 5), 2: (6,)}, [0, 1, 2], 7) == {0: (0, 1), 1: (3, 4, 5), 2: (2, 6)}


def test_membership_join_return_and_leave():
    from strategy.membership import Member, Membership

    m = Membership({7: 0, 11: 1})
    assert m.join(20, 2) == "join" and m.members[2] == Member(2, 20)
    m.members[1].absent, m.members[1].needs_full = 3, False
    m.deactivate([1])
    assert m.members[1].active is False and m.active == [0, 2] and m.partition_of(11) is None
    assert m.join(12, 1) == "return"  # back under a new node id: active, nothing missed, a full model
    assert m.members[1] == Member(1, 12, active=True, absent=0, needs_full=True)
    assert m.partition_of(12) == 1 and m.active == [0, 1, 2]


def test_membership_from_a_saved_run():
    from strategy.membership import Member, Membership

    saved = {
        "0": {"active": True, "absent": 2, "strikes": 1},  # connected now (node 7)
        "1": {"active": True, "absent": 0},  # not connected now: inactive until it returns
        "3": {"active": True, "absent": 1, "strikes": 2, "quarantined": True},
    }
    m = Membership({7: 0, 9: 2})  # partition 2 is connected but unknown to the saved run: kept as it is
    m.members[0].needs_full = m.members[2].needs_full = False
    m.members[2].absent = 5
    m.load_state_dict(saved)
    assert m.members == {
        0: Member(0, 7, active=True, absent=2, needs_full=True, strikes=1),
        1: Member(1, -1, active=False, absent=0, needs_full=True),
        3: Member(3, -1, active=False, absent=1, needs_full=True, strikes=2, quarantined=True),
        2: Member(2, 9, active=True, absent=5, needs_full=True),
    }
    assert m.active == [0, 2]


def test_membership_rounds_count_absence_and_who_needs_the_whole_model():
    from strategy.membership import Membership

    m = Membership({20: 0, 10: 1, 30: 2})
    assert list(m.members) == [0, 1, 2]  # by partition id, whatever the node ids
    m.members[0].needs_full = m.members[1].needs_full = m.members[2].needs_full = False
    m.record_round({0, 1}, lambda pid: pid == 0)  # 0 and 1 sent valid updates; only 0 must resync
    assert [(x.absent, x.needs_full) for x in m.members.values()] == [(0, True), (0, False), (1, True)]
    m.record_round({0}, lambda pid: False)
    assert [(x.absent, x.needs_full) for x in m.members.values()] == [(0, False), (1, True), (2, True)]
    assert m.absent_for(2) == [2] and m.absent_for(0) == []


# -- which experts each node holds (strategy/residency.py), by hand -------------------------------
def test_residency_settings_parse_and_a_nodes_ask_replaces_its_chosen_set():
    import pytest

    from strategy.residency import Residency, extra_experts

    assert [extra_experts(r) for r in ("all", "owned", "owned+1", "owned+12")] == [None, 0, 1, 12]
    for bad in ("owned+0", "owned+", "owned+-1", "some", "Owned"):
        with pytest.raises(ValueError, match="all, owned or owned"):
            extra_experts(bad)
    res = Residency("owned+1", num_experts=4, every=2)
    res.held = {0: [[0, 1]], 1: [[2, 3]]}
    res.ask(1, "owned")  # its own setting: its old set goes, the next update chooses afresh
    assert res.asks == {1: 0} and res.held == {0: [[0, 1]]} and res._extra(1) == 0 and res._extra(0) == 1
    res.held[1] = [[2]]
    res.ask(1, None)  # back to the run's setting
    assert res.asks == {} and res.held == {0: [[0, 1]]} and res._extra(1) == 1


def test_residency_chooses_each_layers_busiest_others_when_due_and_survives_a_checkpoint():
    from strategy.residency import Residency

    res = Residency("owned+1", num_experts=4, every=2)
    load = {0: [[0.1, 0.2, 0.6, 0.1], [0.4, 0.1, 0.1, 0.4]]}  # node 0's own picks, two layers
    federation = [[0.0, 0.0, 0.1, 0.9], [0.0, 0.0, 0.9, 0.1]]
    # Node 0 owns expert 1: layer 0's busiest other is 2; layer 1 ties 0 and 3 at 0.4, the lower id wins.
    # Node 1 owns 3 and has not reported: the federation's load picks 2 in both layers.
    changed = res.update(1, {0: [1], 1: [3]}, load, federation, num_layers=2)
    assert changed == {0: [[1, 2], [0, 1]], 1: [[2, 3], [2, 3]]} == res.held
    assert res.absent(0) == [[0, 3], [2, 3]] and res.absent(7) is None
    # Round 2 is not due (every 2): nothing re-chosen although the load moved; round 3 is.
    load = {0: [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]}
    assert res.update(2, {0: [1], 1: [3]}, load, federation, num_layers=2) == {}
    assert res.update(3, {0: [1], 1: [3]}, load, federation, num_layers=2) == {0: [[1, 3], [1, 2]]}
    # Experts that change owner force a choice at once, due or not; a node that left is forgotten.
    assert res.update(4, {0: [0, 1]}, load, None, num_layers=2) == {0: [[0, 1, 3], [0, 1, 2]]}
    assert res.held == {0: [[0, 1, 3], [0, 1, 2]]}
    # A checkpoint keeps the sets (JSON: string keys); loading sorts and converts what it reads.
    state = res.state_dict()
    assert state == {"held": {"0": [[0, 1, 3], [0, 1, 2]]}}
    other = Residency("owned+1", num_experts=4, every=2)
    other.load_state_dict({"held": {"5": [[3, "1"], [2, 0]]}})
    assert other.held == {5: [[1, 3], [0, 2]]}
    other.load_state_dict({})
    assert other.held == {}


def test_all_holds_everything_and_owned_holds_only_its_own():
    from strategy.residency import Residency

    everything = Residency("all", num_experts=3, every=1)
    assert everything.update(1, {0: [0]}, {}, None, num_layers=1) == {} and everything.absent(0) is None
    owned = Residency("owned", num_experts=3, every=1)
    assert owned.update(1, {0: [2]}, {}, None, num_layers=2) == {0: [[2], [2]]}
    assert owned.absent(0) == [[0, 1], [0, 1]]
    owned.ask(0, "all")  # a large node in an owned run holds everything
    assert owned.update(2, {0: [2]}, {}, None, num_layers=2) == {} and owned.absent(0) is None


def test_residency_is_due_every_n_rounds_and_an_owner_change_elsewhere_is_not_missed():
    from strategy.residency import Residency, absent_share

    res = Residency("owned+1", num_experts=4, every=3)
    load = {0: [[0.0, 0.0, 1.0, 0.0]], 1: [[1.0, 0.0, 0.0, 0.0]]}
    assert res.update(1, {0: [0], 1: [1]}, load, None, num_layers=1) == {0: [[0, 2]], 1: [[0, 1]]}
    moved = {0: [[0.0, 0.0, 0.0, 1.0]], 1: [[0.0, 0.0, 1.0, 0.0]]}
    assert [res.update(r, {0: [0], 1: [1]}, moved, None, num_layers=1) for r in (2, 3)] == [{}, {}]
    assert res.update(4, {0: [0], 1: [1]}, moved, None, num_layers=1) == {0: [[0, 3]], 1: [[1, 2]]}
    # Round 5 is not due: node 0 is passed over, node 1 got expert 3 and is chosen for at once.
    assert res.update(5, {0: [0], 1: [1, 3]}, moved, None, num_layers=1) == {1: [[1, 2, 3]]}
    # A node that asked for `owned` in a run of full replicas holds its own experts only.
    everything = Residency("all", num_experts=3, every=1)
    everything.ask(0, "owned")
    everything.update(1, {0: [2], 1: [0, 1]}, {}, None, num_layers=1)
    assert everything.absent(0) == [[0, 1]] and everything.absent(1) is None
    # The share of a node's picks that went to experts it lacks: mean over layers of their load.
    load2 = [[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]]
    assert absent_share(load2, [[2, 3], [0]]) == {"absent_share": (0.25 + 0.1) / 2}
    assert absent_share(load2, [[], []]) == absent_share(None, [[1], [1]]) == absent_share(load2, None) == {}


def test_an_experts_federation_load_comes_from_the_nodes_that_hold_it(flower_task):
    """Partial residency (owned, mask): a node routes no token to an expert it does not hold and
    reports 0 there; the federation's median is over the holders, not over those zeros."""
    from pytest import approx

    from common import keys

    _task_identity()
    cfg = StrategyConfig(local_steps=5, merge=MergeSchedule(enabled=False), residency="owned", absent_policy="mask")
    s = SpesStrategy(cfg, E, {10: 0, 11: 1, 12: 2}, num_rounds=3, num_layers=2)
    msgs = list(s.configure_train(1, encode(_toy_params(0)), ConfigRecord({}), None))
    assert s.owners == {0: (0, 1), 1: (2,), 2: (3,)}
    chosen = [e for e in s.events if e["event"] == "residency"]
    assert chosen == [
        {"round": 1, "event": "residency", "partition": p, "experts": [list(s.owners[p])] * 2} for p in range(3)
    ]
    loads = {0: [0.6, 0.4, 0.0, 0.0], 1: [0.0, 0.0, 1.0, 0.0], 2: [0.0, 0.0, 0.0, 1.0]}
    replies = []
    for msg in msgs:
        pid = msg.metadata.dst_node_id - 10
        names = shared_param_names(s.params) + expert_param_names(s.params, s.owners[pid])
        metrics = MetricRecord({"num-tokens": 10.0, keys.EXPERT_LOAD: loads[pid] * 2})
        update = encode({n: s.params[n] + 0.01 for n in names})
        replies.append(Message(RecordDict({"arrays": update, "metrics": metrics}), reply_to=msg))
    s.aggregate_train(1, replies)
    # Each expert has one holder: medians 0.6, 0.4, 1, 1, renormalised to shares.
    assert s.history[-1].applied and s.balance.load == [approx([0.2, 0.4 / 3, 1 / 3, 1 / 3])] * 2
    # A node joining now has no load of its own yet: it holds its experts plus the federation's
    # busiest other one per layer (experts 2 and 3 tie at 1/3: the lower index).
    s.add_node(13, 3, residency="owned+1")
    msgs = list(s.configure_train(2, None, ConfigRecord({}), None))
    assert s.owners[3] == (1,)
    assert s.events[-1] == {"round": 2, "event": "residency", "partition": 3, "experts": [[1, 2], [1, 2]]}
    # Without fragments a node is told no fragment and the round records none.
    assert all(keys.SYNC_FRAGMENT not in m.content["config"] for m in msgs) and s.history[-1].fragment is None
