"""The coordinator's round loop (server_app/rounds.py) and checkpoints (server_app/checkpoint.py), directly.

Nodes are real Flower ClientApps served in this process by engine/inprocess.py's Grid; a grid
that holds some nodes' replies back stands in for a slow network. No torch model is involved.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from test_strategy import H, I, make_strategy, run_round, toy_params

from common import keys
from common.codec import decode, encode
from engine.inprocess import FIRST_NODE_ID, InProcessGrid, coordinator_identity
from model.naming import expert_param_names
from server_app import checkpoint
from server_app.rounds import Collector, RunFailed, discover, setup_nodes


@pytest.fixture(autouse=True)
def as_coordinator():
    """Flower builds a message's metadata from the identity of the task running in the process."""
    with coordinator_identity(1):
        yield


def _app(claims: dict[int, object], parts: dict[int, int] | None = None, asks: dict | None = None) -> ClientApp:
    """Node i answers the setup query with partition id claims[i] and num-partitions parts[i] (default:
    the number of nodes) and residency asks[i] where given, or raises where the claim is an exception."""
    app = ClientApp()

    @app.query()
    def setup(msg: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        claim = claims[i]
        if isinstance(claim, Exception):
            raise claim
        n = (parts or {}).get(i, len(claims))
        cfg = ConfigRecord({} if claim is None else {keys.PARTITION_ID: claim, keys.NUM_PARTITIONS: n})
        if i in (asks or {}):
            cfg[keys.RESIDENCY_ASK] = asks[i]
        return Message(RecordDict({keys.CONFIG: cfg}), reply_to=msg)

    return app


class SlowGrid(InProcessGrid):
    """Replies of the nodes in `held` are not there to pull until released."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        super().__init__(app, num_nodes)
        self.held: set[int] = set()
        self._late: dict[str, Message] = {}

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for msg_id, msg in zip(ids, messages, strict=True):
            if msg.metadata.dst_node_id in self.held:
                self._late[msg_id] = self._replies.pop(msg_id)
        return ids

    def release(self) -> None:
        self._replies.update(self._late)
        self._late.clear()


def _queries(grid, nodes) -> list[Message]:
    return [Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]


def test_exchange_closes_at_the_deadline_and_drops_the_late_reply_next_time(caplog):
    grid = SlowGrid(_app({0: 0, 1: 1, 2: 2}), 3)
    collector = Collector(grid)
    nodes = list(grid.get_node_ids())
    grid.held = {nodes[2]}
    sent = []
    replies = collector.exchange(_queries(grid, nodes), 0.5, lambda ids, msgs: sent.extend(ids))
    assert len(sent) == 3 and sorted(m.metadata.src_node_id for m in replies) == nodes[:2]
    grid.held = set()
    grid.release()  # the slow node's reply to round 1 arrives during round 2
    with caplog.at_level(logging.WARNING, logger="spes.server"):
        again = collector.exchange(_queries(grid, nodes), 5.0)
    assert sorted(m.metadata.src_node_id for m in again) == nodes  # each node once, all of this round
    assert {m.metadata.reply_to_message_id for m in again}.isdisjoint(sent)
    assert f"late reply from node {nodes[2]} to an earlier round dropped" in caplog.text
    assert collector.exchange([], 1.0) == []


def test_setup_nodes_keeps_good_answers_and_names_the_bad():
    claims = {0: 3, 1: True, 2: -1, 3: None, 4: RuntimeError("no disk")}
    grid = InProcessGrid(_app(claims), 5)
    nodes = list(grid.get_node_ids())
    got = setup_nodes(grid, nodes, ConfigRecord({}), Collector(grid), 5.0)
    partitions, errors = got.partitions, got.errors
    assert partitions == {nodes[0]: 3} and got.num_partitions == {nodes[0]: 5}
    assert len(errors) == 4 and all(e.startswith(f"node {n}:") for e, n in zip(sorted(errors), sorted(nodes[1:])))
    assert sum("malformed setup reply" in e for e in errors) == 3 and sum("no disk" in e for e in errors) == 1


def test_a_node_asking_for_a_residency_is_heard_and_a_malformed_ask_refused():
    grid = InProcessGrid(_app({0: 0, 1: 1, 2: 2}, asks={1: "owned+2", 2: "most"}), 3)
    nodes = list(grid.get_node_ids())
    got = setup_nodes(grid, nodes, ConfigRecord({}), Collector(grid), 5.0)
    assert got.partitions == {nodes[0]: 0, nodes[1]: 1} and got.residency == {nodes[1]: "owned+2"}
    assert got.errors == [f"node {nodes[2]}: malformed setup reply (residency 'most')"]


def test_discover_takes_the_lowest_partitions_and_refuses_shared_ones():
    grid = InProcessGrid(_app({0: 2, 1: 0, 2: 1}), 3)
    chosen, num_partitions, _, _ = discover(grid, 2, ConfigRecord({}), Collector(grid), 5.0)
    assert chosen == {FIRST_NODE_ID + 1: 0, FIRST_NODE_ID + 2: 1} and num_partitions == 3
    shared = InProcessGrid(_app({0: 1, 1: 1}), 2)
    with pytest.raises(RunFailed, match="two SuperNodes share a partition id"):
        discover(shared, 2, ConfigRecord({}), Collector(shared), 5.0)
    with pytest.raises(RunFailed, match="waited 0s for 3 SuperNodes, 2 connected"):
        discover(shared, 3, ConfigRecord({}), Collector(shared), 0.0)


def test_every_node_of_a_run_shards_the_data_in_one_num_partitions():
    """Nodes that split the data differently would train on overlapping shards: discovery refuses
    a federation that disagrees, and a joiner with another num-partitions is not admitted."""
    grid = InProcessGrid(_app({0: 0, 1: 1}, parts={0: 2, 1: 3}), 2)
    with pytest.raises(RunFailed, match=r"disagree on num-partitions \(partition 0: 2, partition 1: 3\)"):
        discover(grid, 2, ConfigRecord({}), Collector(grid), 5.0)
    grid = InProcessGrid(_app({0: 0, 1: 5, 2: 6}, parts={1: 8, 2: 4}), 3)
    nodes = list(grid.get_node_ids())
    got = setup_nodes(grid, nodes, ConfigRecord({}), Collector(grid), 5.0, num_partitions=8)
    assert got.partitions == {nodes[1]: 5} and got.num_partitions == {nodes[1]: 8}
    assert sorted(e.split(":")[0] for e in got.errors) == [f"node {nodes[0]}", f"node {nodes[2]}"]
    assert all("restart it with num-partitions=8" in e for e in got.errors), got.errors


def test_checkpoints_keep_the_newest_two_bit_exact_and_skip_an_unreadable_one(tmp_path, caplog):
    root = tmp_path / "checkpoint"
    (root / ".tmp-dead").mkdir(parents=True)  # left by a crash mid-save
    params = {"w": torch.tensor([1.0, 1e-30, -3.5]), "b": torch.arange(4.0).reshape(2, 2).t()}  # not contiguous
    for r in (1, 2, 3):
        checkpoint.save(root, r, {k: v + r for k, v in params.items()}, {"m": torch.full((2,), float(r))}, {"x": r})
    assert checkpoint.rounds(root) == [2, 3] and not (root / ".tmp-dead").exists()
    got, outer, state = checkpoint.load_latest(root)
    assert torch.equal(got["w"], params["w"] + 3) and torch.equal(got["b"], params["b"] + 3)
    assert torch.equal(outer["m"], torch.full((2,), 3.0)) and state == {"x": 3, "round": 3}
    checkpoint.save(root, 3, params, {}, {"x": "again"})  # a repeated round replaces its checkpoint
    assert json.loads((root / "round-000003" / "state.json").read_text())["x"] == "again"
    (root / "round-000003" / "params.safetensors").write_bytes(b"torn")
    with caplog.at_level(logging.WARNING, logger="spes.server"):
        got, _, state = checkpoint.load_latest(root)
    assert state["round"] == 2 and torch.equal(got["w"], params["w"] + 2)
    assert "round-000003 unreadable" in caplog.text
    assert checkpoint.load_latest(tmp_path / "none") is None


# -- the strategy's replies one by one, hand-built as in tests/test_strategy.py ----------------
def _nan_norm(update):
    """A node's update with a NaN final norm weight: refused by the strategy's checks."""
    return {**update, "model.norm.weight": torch.full_like(update["model.norm.weight"], math.nan)}


def test_replies_are_matched_to_the_messages_pushed_this_round(flower_task):
    s = make_strategy()
    msgs, _, replies = run_round(s, 1, encode(toy_params(0)), tokens=[100, 100])
    stale = list(s.configure_train(1, None, ConfigRecord({}), None))[0]  # a message of an earlier push
    stale.metadata.__dict__["_message_id"] = "earlier"
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"m{i}"  # as the grid names a pushed message
    s.register_sent(["m0", "m1"], msgs)
    replies = [Message(r.content, reply_to=m) for r, m in zip(replies, msgs)]
    late = Message(replies[0].content, reply_to=stale)  # node 7 again, answering the earlier message
    s.aggregate_train(1, [late, *replies])
    assert [n["status"] for n in s.history[-1].nodes.values()] == ["ok", "ok"]
    s.configure_train(2, None, ConfigRecord({}), None)
    s.register_sent(["m2", ""], msgs)  # the second push failed: no id
    s.aggregate_train(2, [Message(replies[1].content, reply_to=msgs[1])])  # an id of round 1
    assert [n["status"] for n in s.history[-1].nodes.values()] == ["no reply", "no reply"]


def test_each_malformed_reply_is_refused_by_its_own_check(flower_task):
    params = toy_params(0)
    own1 = expert_param_names(params, [4])[0]  # an expert of partition 1
    other = expert_param_names(params, [0])[0]  # one of partition 0's
    cases = {
        "arrays only": (None, "reply needs an ArrayRecord 'arrays' and a MetricRecord 'metrics'"),
        "an expert it does not own": ({other: params[other]}, f"1 unexpected parameter(s), e.g. ['{other}']"),
        "a wrong shape": ({own1: torch.zeros(3)}, f"{own1}: got (3,) float32, expected ({I}, {H}) float32"),
        "too large a change": ({own1: params[own1] * 3}, f"{own1}: change"),
    }
    for case, (tamper, why) in cases.items():
        s = make_strategy(max_update_ratio=0.5)
        msgs, _, replies = run_round(s, 1, encode(params), tokens=[100, 100])
        content = RecordDict({"arrays": replies[1].content["arrays"]})
        if tamper is not None:
            arrays = encode({**decode(replies[1].content["arrays"]), **tamper})
            content = RecordDict({"arrays": arrays, "metrics": replies[1].content["metrics"]})
        s.aggregate_train(1, [replies[0], Message(content, reply_to=msgs[1])])
        status = s.history[-1].nodes["1"]["status"]
        assert status.startswith(f"rejected: {why}"), (case, status)  # the wrong shape: found as decoded
        assert s.history[-1].nodes["0"]["status"] == "ok"


def test_a_round_record_accounts_each_node_on_its_own(flower_task):
    from common.codec import payload_bytes, wire_bytes

    params = toy_params(0)
    s = make_strategy()

    msgs, _, replies = run_round(s, 1, encode(params), tokens=[100, 300], tamper={1: _nan_norm})
    _, metrics = s.aggregate_train(1, replies)
    rec = s.history[-1]
    assert [rec.nodes[k]["partition_id"] for k in ("0", "1")] == [0, 1]
    assert (rec.nodes["1"]["bytes_up"], rec.nodes["1"]["wire_bytes_up"]) == (0, 0)  # rejected: nothing counted up
    assert dict(metrics) == {
        "global_step": 10.0,
        "merge_alpha": 0.0,
        "tokens": 100.0,
        "bytes_up": float(rec.nodes["0"]["bytes_up"]),
        "bytes_down": float(sum(payload_bytes(m.content["arrays"]) for m in msgs)),
    }
    # Round 2: partition 1 needs the whole model again, partition 0 only what it does not own.
    msgs, _, replies = run_round(s, 2, None, tokens=[100, 100])
    s.aggregate_train(2, replies)
    nodes = s.history[-1].nodes
    sizes = [payload_bytes(m.content["arrays"]) for m in msgs]
    assert sizes[0] < sizes[1] and [nodes[k]["bytes_down"] for k in ("0", "1")] == sizes
    assert [nodes[k]["wire_bytes_down"] for k in ("0", "1")] == [wire_bytes(m.content["arrays"]) for m in msgs]


def test_a_second_reply_voids_the_partitions_round_and_no_other(flower_task):
    params = toy_params(0)
    s = make_strategy()

    msgs, _, replies = run_round(s, 1, encode(params), tokens=[100, 100], tamper={0: _nan_norm})
    again = Message(replies[0].content, reply_to=msgs[0])  # partition 0's rejected reply, sent twice
    s.aggregate_train(1, [replies[0], again, replies[1]])
    nodes = s.history[-1].nodes
    assert nodes["0"]["status"] == "rejected: duplicate reply" and nodes["1"]["status"] == "ok"


def test_an_error_reply_first_leaves_the_other_replies_of_the_round(flower_task):
    from flwr.app import Error

    s = make_strategy()
    msgs, _, replies = run_round(s, 1, encode(toy_params(0)), tokens=[100, 100])
    failed = Message(Error(code=1, reason="out of memory"), reply_to=msgs[0])
    s.aggregate_train(1, [failed, replies[1]])
    nodes = s.history[-1].nodes
    assert nodes["0"]["status"] == "error: out of memory" and nodes["1"]["status"] == "ok"


def test_with_min_nodes_0_a_round_needs_every_node(flower_task):
    s = make_strategy(min_nodes=0)
    before = toy_params(0)
    _, _, replies = run_round(s, 1, encode(before), tokens=[100, 100], tamper={1: _nan_norm})
    s.aggregate_train(1, replies)
    rec = s.history[-1]
    assert not rec.applied and rec.refused == "1 valid update(s), quorum 2"
    assert all(torch.equal(s.params[n], before[n]) for n in before) and s.global_step == 0
