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
    assert [e["event"] for e in s.events] == ["leave", "reassign"]


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
    assert state["members"]["2"]["active"] and state["events"][0]["event"] == "join"
