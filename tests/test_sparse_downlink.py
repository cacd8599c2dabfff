"""Delta sync end to end without Flower: the real strategy and two real nodes (tiny model, a few steps).

Checks that a node's copy of the model is bit-equal to the coordinator's copy after every
round, that a downlink carries nothing a node already holds (its own experts, tensors that did
not move), that a node that lost its state is resynced bit-exactly, that the bytes counted are
the encoded ones, and that hostile delta replies are rejected.
"""

import shutil

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from strategy_rounds import play_round

from client_app.local_round import NodeContext
from client_app.node_state import NodeState
from common import keys
from common.codec import Codec, encode_delta, to_record
from common.spec import from_dict
from model import build_model
from model.naming import expert_param_names, shared_param_names
from server_app.config import compose
from strategy.spes import SpesStrategy

E = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data import load_tokenizer

    tmp = tmp_path_factory.mktemp("delta")
    raw = compose(
        [
            "model.hidden_size=32",
            "model.expert_ffn=16",
            "model.num_layers=1",
            f"model.num_experts={E}",
            "strategy.merge.enabled=false",
            "data.vocab_size=300",
            "data.seq_len=16",
            "train.batch_size=2",
            "nodes=2",
            "strategy.local_steps=2",
            "strategy.delta_sync=true",
            "strategy.uplink_codec=int8",
            "strategy.downlink_codec=int8",
            "strategy.error_feedback=true",
        ]
    )
    spec = from_dict(raw)
    tok = load_tokenizer(spec.data, tmp / "cache")
    return spec, tok, tmp


def node_copy(ctx, s):
    """The copy of the model the node trained from in the round just played (its saved base)."""
    root = ctx.workdir / "state"
    step = max(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-"))
    return NodeState.load(root, step).base


def test_delta_sync_versions_relay_and_resync(setup, flower_task):
    spec, tok, tmp = setup
    ctxs = [NodeContext(spec, tok, tmp / f"node{p}", p, 2, progress=False) for p in (0, 1)]
    model = build_model(spec.model, len(tok), seed=0)
    s = SpesStrategy(spec.strategy, E, {10: 0, 11: 1}, num_rounds=5, max_tokens=2 * 2 * 16, num_layers=1)
    s.initialize(model.state_dict())
    names = list(s.params)
    own = {p: set(expert_param_names(names, s.experts_of(p))) for p in (0, 1)}

    # Round 1: nothing held yet, every node gets every tensor whole (fp32) and trains from it.
    msgs, _ = play_round(s, 1, ctxs)
    assert all(m.content["config"][keys.FULL_MODEL] for m in msgs)
    assert set(msgs[0].content["arrays"]) == set(names)
    for ctx in ctxs:
        base = node_copy(ctx, s)
        assert all(torch.equal(base[n], s.sync.shadow[n]) for n in names)
    rec = s.history[-1]
    assert rec.applied and all(n["status"] == "ok" for n in rec.nodes.values())
    # Encoded bytes up: int8 values plus one float32 scale per row, for shared + owned tensors.
    for p in (0, 1):
        up = shared_param_names(names) + sorted(own[p])
        rows = sum(s.params[n].numel() // s.params[n].shape[-1] for n in up)
        assert rec.nodes[str(p)]["bytes_up"] == sum(s.params[n].numel() for n in up) + 4 * rows
        assert rec.nodes[str(p)]["wire_bytes_up"] > rec.nodes[str(p)]["bytes_up"]

    global_after_1 = {n: s.params[n].clone() for n in names}
    # Round 2: the owner applies its own experts itself; the others' experts arrive as the owner's
    # relayed int8 arrays; shared tensors as int8 moves. Copies stay bit-equal to the coordinator's.
    msgs, _ = play_round(s, 2, ctxs)
    for m in msgs:
        p = m.metadata.dst_node_id - 10
        cfg, arrays = m.content["config"], m.content["arrays"]
        assert not cfg[keys.FULL_MODEL] and cfg[keys.APPLY_OWN] and cfg[keys.BASE_STEP] == 2
        sent = {k.partition("#")[0] for k in arrays}
        assert not sent & own[p]
        assert own[1 - p] <= sent and all(k.endswith(("#int8", "#int8-scale")) for k in arrays)
    for ctx in ctxs:
        base = node_copy(ctx, s)
        assert all(torch.equal(base[n], s.sync.shadow[n]) for n in names)
    # The relayed experts are bit-exactly the global model (no second quantisation).
    assert all(torch.equal(s.sync.shadow[n], global_after_1[n]) for n in own[0] | own[1])

    # Round 3: node 1 lost its state; it cannot train from a delta and says so.
    shutil.rmtree(ctxs[1].workdir / "state")
    play_round(s, 3, ctxs, fail={1})
    assert s.history[-1].nodes["1"]["status"].startswith("error")
    # Round 4: node 0 gets nothing for node 1's experts (they did not move); node 1 is resynced whole.
    msgs, _ = play_round(s, 4, ctxs)
    by_pid = {m.metadata.dst_node_id - 10: m for m in msgs}
    sent0 = {k.partition("#")[0] for k in by_pid[0].content["arrays"]}
    assert not sent0 & (own[0] | own[1])
    assert by_pid[1].content["config"][keys.FULL_MODEL] and set(by_pid[1].content["arrays"]) == set(names)
    for ctx in ctxs:
        base = node_copy(ctx, s)
        assert all(torch.equal(base[n], s.sync.shadow[n]) for n in names)
    assert all(n["status"] == "ok" for n in s.history[-1].nodes.values())


def _toy_strategy(**cfg):
    from common.spec import MergeSchedule, StrategyConfig
    from faults.cases import _toy_params

    c = StrategyConfig(
        local_steps=5,
        merge=MergeSchedule(enabled=False),
        delta_sync=True,
        uplink_codec="int8",
        downlink_codec="int8",
        **cfg,
    )
    s = SpesStrategy(c, E, {10: 0, 11: 1}, num_rounds=3, num_layers=2)
    s.initialize(_toy_params(0))
    return s


def _delta_reply(msg, arrays):
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord(arrays) if isinstance(arrays, dict) else arrays,
                "metrics": MetricRecord({"num-tokens": 10.0}),
            }
        ),
        reply_to=msg,
    )


def test_hostile_delta_replies_rejected(flower_task):
    s = _toy_strategy(max_abs_value=100.0)
    msgs = list(s.configure_train(1, None, ConfigRecord({}), None))
    names = list(s.params)
    up = {p: shared_param_names(names) + expert_param_names(names, s.experts_of(p)) for p in (0, 1)}
    good = to_record(encode_delta({n: torch.full_like(s.params[n], 0.01) for n in up[0]}, Codec("int8")))
    # Node 1: a delta that reconstructs to values beyond max_abs_value (validated after reconstruction).
    huge = to_record(encode_delta({n: torch.full_like(s.params[n], 1e6) for n in up[1]}, Codec("int8")))
    s.aggregate_train(1, [_delta_reply(msgs[0], good), _delta_reply(msgs[1], huge)])
    nodes = s.history[-1].nodes
    assert nodes["0"]["status"] == "ok" and "exceeds" in nodes["1"]["status"]

    msgs = list(s.configure_train(2, None, ConfigRecord({}), None))
    # Whole tensors where differences are expected, and an oversized declared scale array.
    whole = {n: s.params[n].numpy() for n in up[0]}
    arrays = encode_delta({n: torch.zeros_like(s.params[n]) for n in up[1]}, Codec("int8"))
    first = up[1][0]
    arrays[f"{first}#int8-scale"] = np.ones(10**5, np.float32)
    s.aggregate_train(2, [_delta_reply(msgs[0], to_record(whole)), _delta_reply(msgs[1], to_record(arrays))])
    nodes = s.history[-1].nodes
    assert "whole tensors" in nodes["0"]["status"]
    assert "int8-scale" in nodes["1"]["status"] and "expected" in nodes["1"]["status"]
    assert not s.history[-1].applied


def test_downlink_shadow_survives_a_checkpoint(flower_task):
    s = _toy_strategy()
    msgs = list(s.configure_train(1, None, ConfigRecord({}), None))
    names = list(s.params)
    replies = []
    for p, msg in enumerate(msgs):
        up = shared_param_names(names) + expert_param_names(names, s.experts_of(p))
        replies.append(
            _delta_reply(
                msg, to_record(encode_delta({n: torch.randn_like(s.params[n]) * 0.1 for n in up}, Codec("int8")))
            )
        )
    s.aggregate_train(1, replies)
    list(s.configure_train(2, None, ConfigRecord({}), None))  # the shadow trails the model by a residual
    assert any(not torch.equal(s.sync.shadow[n], s.params[n]) for n in names)
    state, tensors = s.state_dict(), s.outer_buffers()
    t = _toy_strategy()
    t.initialize(s.params)
    t.load_state_dict(state, tensors)
    assert all(torch.equal(t.sync.shadow[n], s.sync.shadow[n]) for n in names)
    assert t.sync.version == s.sync.version and t.outer.buffers == {}
    # After a resume every node is resynced whole from that shadow.
    msgs = list(t.configure_train(3, None, ConfigRecord({}), None))
    assert all(m.content["config"][keys.FULL_MODEL] for m in msgs)
    assert all(np.array_equal(m.content["arrays"][n].numpy(), t.sync.shadow[n].numpy()) for m in msgs for n in names)


def test_a_node_whose_experts_changed_is_resynced_whole(flower_task):
    s = _toy_strategy()
    names = list(s.params)
    for rnd in (1, 2):
        msgs = list(s.configure_train(rnd, None, ConfigRecord({}), None))
        ups = [shared_param_names(names) + expert_param_names(names, s.experts_of(p)) for p in (0, 1)]
        deltas = [{n: torch.full_like(s.params[n], 0.01) for n in up} for up in ups]
        s.aggregate_train(
            rnd, [_delta_reply(m, to_record(encode_delta(d, Codec("int8")))) for m, d in zip(msgs, deltas)]
        )
    before = dict(s.owners)
    s.add_node(12, 2)  # the newcomer takes a share: some of the others' experts change hands
    moved = {p for p in (0, 1) if s.owners[p] != before[p]}
    assert moved
    msgs = {m.metadata.dst_node_id - 10: m for m in s.configure_train(3, None, ConfigRecord({}), None)}
    for p, m in msgs.items():
        cfg = m.content["config"]
        whole = p in moved or p == 2
        assert cfg[keys.FULL_MODEL] == whole
        if whole:  # every tensor whole, from no base: whatever the node held is not the new ownership's
            assert cfg[keys.BASE_STEP] == -1 and set(m.content["arrays"]) == set(names)
        else:
            assert cfg[keys.BASE_STEP] == 10


# -- the coordinator's bookkeeping by itself (strategy/versions.py), fp32: every move exact -------
def _fp32_diff(name, delta):
    return dict(to_record(encode_delta({name: delta}, Codec("fp32"))))


def test_versioned_downlink_sends_each_node_what_it_lacks(flower_task):
    from strategy.versions import VersionedDownlink

    vd = VersionedDownlink(Codec("fp32"), Codec("fp32"))
    assert vd.tensors() == {} and vd.state_dict() == {"version": {}}
    a0, e0 = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -0.5])
    owner = {"e": 1}.get  # node 1 owns the expert "e"; "a" is shared
    vd.refresh({"a": a0, "e": e0}, owner)
    assert vd.version == {"a": 0, "e": 0}
    # Nothing held yet, or full asked: the whole shadow, base -1, nothing to apply by itself.
    for pid in (0, 1):
        rec, base, apply_own = vd.message(pid, full=False)
        assert (base, apply_own) == (-1, False) and set(rec) == {"a", "e"}
        assert np.array_equal(rec["e"].numpy(), e0.numpy())
    vd.commit(0, True, 3)
    # Node 1 trained e by d; the global e is exactly its copy plus d: relayed, not re-encoded.
    d = torch.tensor([0.25, 0.125])
    reply = ArrayRecord(_fp32_diff("a", torch.zeros(2)) | _fp32_diff("e", d))
    trained, relay = vd.reconstruct(reply, {"a", "e"}, own={"e"})
    assert torch.equal(trained["e"], e0 + d) and set(relay) == {"e"}
    vd.commit(1, True, 3, own=relay)
    a1 = torch.tensor([1.5, 2.0])  # the shared tensor moved (the mean of the nodes)
    vd.refresh({"a": a1, "e": e0 + d}, owner)
    assert vd.version == {"a": 1, "e": 1} and torch.equal(vd.shadow["a"], a1)
    assert vd.moves["e"].relayed_from == 1 and vd.moves["a"].relayed_from is None
    # Node 1 holds e as it sent it: only a's move comes down, and it applies its own e itself.
    rec, base, apply_own = vd.message(1, full=False)
    assert (set(rec), base, apply_own) == ({"a"}, 3, True)  # fp32: the new value itself
    # Node 0 gets both moves (e as node 1's own arrays), and applies nothing by itself.
    rec, base, apply_own = vd.message(0, full=False)
    assert (set(rec), base, apply_own) == ({"a", "e#fp32"}, 3, False)
    assert np.array_equal(rec["e#fp32"].numpy(), d.numpy())
    # Asked for a full copy, a node that holds everything still gets it whole.
    rec, base, _ = vd.message(0, full=True)
    assert base == -1 and set(rec) == {"a", "e"}


def test_an_fp32_move_is_exact_so_an_unchanged_tensor_never_moves_again(flower_task):
    """0.1 + (-2.9 - 3.3) != -2.9 in float32 (2.4e-7 off): a difference would leave that behind
    and send the whole tensor again next round, though nothing changed."""
    from common.codec import apply_delta
    from strategy.versions import VersionedDownlink

    current, target = torch.tensor([0.1, 3.3]), torch.tensor([0.7, -2.9])
    assert not torch.equal(apply_delta(current, target - current), target)
    vd = VersionedDownlink(Codec("fp32"), Codec("fp32"))
    vd.refresh({"w": current}, lambda name: None)
    vd.refresh({"w": target}, lambda name: None)
    assert torch.equal(vd.shadow["w"], target) and vd.version == {"w": 1}
    vd.refresh({"w": target.clone()}, lambda name: None)
    assert vd.version == {"w": 1}  # no second move


def test_a_lossy_move_brings_the_shadow_within_the_codecs_error_and_the_rest_follows():
    """int8 per row: the shadow lands within max|difference| / 254 of the global value in each row,
    and what it dropped is the next round's move (the coordinator's error feedback). A node one
    version behind gets that move; one two behind gets the value whole."""
    from strategy.versions import VersionedDownlink

    g = torch.Generator().manual_seed(8)
    current = torch.randn(4, 8, generator=g)
    target = current + torch.randn(4, 8, generator=g)
    vd = VersionedDownlink(Codec("int8"), Codec("int8"))
    vd.refresh({"w": current}, lambda name: None)
    for pid in (0, 1):
        vd.message(pid, full=False)
        vd.commit(pid, True, 1)  # both hold version 0
    vd.refresh({"w": target}, lambda name: None)
    err = (vd.shadow["w"] - target).abs()
    assert (err <= (target - current).abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-5)).all()
    assert err.max() > 0 and vd.version == {"w": 1}
    vd.message(1, full=False)
    vd.commit(1, True, 2)  # node 1 holds version 1, node 0 still 0
    vd.refresh({"w": target}, lambda name: None)
    assert vd.version == {"w": 2} and (vd.shadow["w"] - target).abs().max() < err.max() / 10
    assert set(vd.message(1, full=False)[0]) == set(vd.moves["w"].arrays) and "w" not in vd.moves["w"].arrays
    whole, base, _ = vd.message(0, full=False)
    assert set(whole) == {"w"} and base == 1 and torch.equal(torch.from_numpy(whole["w"].numpy()), vd.shadow["w"])


def test_versioned_downlink_resends_whole_what_a_node_fell_behind_on(flower_task):
    from strategy.versions import VersionedDownlink

    vd = VersionedDownlink(Codec("fp32"), Codec("fp32"))
    owner = {"e": 1}.get
    a, e = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -0.5])
    vd.refresh({"a": a, "e": e}, owner)
    for pid in (0, 1):
        vd.message(pid, full=False)
    vd.commit(0, True, 1)
    reply = ArrayRecord(_fp32_diff("a", torch.zeros(2)) | _fp32_diff("e", torch.ones(2)))
    vd.commit(1, True, 1, own=vd.reconstruct(reply, {"a", "e"}, own={"e"})[1])
    # e was changed by something else than its owner (a merge): moved by the downlink codec, so its
    # owner must take it from the message like everyone; a stayed where it was (no move, no bump).
    vd.refresh({"a": a, "e": torch.tensor([0.75, 0.0])}, owner)
    assert vd.version == {"a": 0, "e": 1} and vd.moves["e"].relayed_from is None
    rec, _, apply_own = vd.message(1, full=False)
    assert set(rec) == {"e"} and not apply_own
    vd.message(0, full=False)
    vd.commit(0, False, 1)  # node 0's reply was invalid: its state is unknown
    assert vd.nodes[0].held == {} and vd.nodes[0].base_step == -1
    vd.refresh({"a": a, "e": torch.tensor([1.0, 0.0])}, owner)  # version 2 of e
    rec, base, _ = vd.message(0, full=False)
    assert base == -1 and set(rec) == {"a", "e"}  # a full resync
    vd.commit(0, True, 2)
    vd.refresh({"a": a, "e": torch.tensor([1.0, 1.0])}, owner)  # e: 3
    vd.refresh({"a": a, "e": torch.tensor([2.0, 1.0])}, owner)  # e: 4, node 0 holds 2: whole
    rec, base, _ = vd.message(0, full=False)
    assert set(rec) == {"e"} and base == 2 and np.array_equal(rec["e"].numpy(), np.array([2.0, 1.0], np.float32))


def test_versioned_downlink_load_keeps_versions_that_match_the_shadow():
    from strategy.versions import VersionedDownlink

    vd = VersionedDownlink(Codec("fp32"), Codec("fp32"))
    shadow = {"a": torch.ones(2), "e": torch.zeros(2)}
    vd.load({"version": {"a": 4, "e": 2}}, shadow)
    assert vd.version == {"a": 4, "e": 2} and vd.moves == {} and vd.nodes == {}
    vd.load({}, shadow)  # no versions saved: everything starts again at 0
    assert vd.version == {"a": 0, "e": 0}
    vd.load({"version": {"a": 4}}, shadow)  # versions of another model: start again
    assert vd.version == {"a": 0, "e": 0}


def test_versioned_downlink_commit_of_a_node_never_sent_anything_and_an_unexpected_tensor(flower_task):
    from strategy.validation import InvalidUpdate
    from strategy.versions import NodeCopy, VersionedDownlink

    vd = VersionedDownlink(Codec("fp32"), Codec("fp32"))
    vd.refresh({"a": torch.ones(2)}, lambda name: None)
    vd.commit(5, True, 7)  # no message went to partition 5: what it holds is unknown
    assert vd.nodes[5] == NodeCopy()
    reply = ArrayRecord(_fp32_diff("a", torch.zeros(2)) | _fp32_diff("x", torch.zeros(2)))
    with pytest.raises(InvalidUpdate, match=r"1 unexpected parameter\(s\), e.g. \['x'\]"):
        vd.reconstruct(reply, {"a"}, own=set())


def _reply_ctx(codec: str, error_feedback: bool, partition: int = 0) -> NodeContext:
    raw = compose(
        ["strategy.delta_sync=true", f"strategy.uplink_codec={codec}", f"strategy.error_feedback={error_feedback}"]
    )
    return NodeContext(from_dict(raw), None, None, partition, 4, progress=False)


def test_uplink_carries_the_difference_plus_last_rounds_residual_only_where_it_fits():
    """fp32 uplink (lossless): what is sent is trained - base + the saved residual of the same
    name and shape; a residual of a tensor not trained now, or of another shape, is dropped."""
    from client_app.delta_sync import delta_reply
    from common.codec import decode_delta

    base = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5, 0.5, 0.5])}
    trained = {"a": torch.tensor([1.5, 1.0]), "b": torch.tensor([1.0, 0.0, 0.5])}
    saved = NodeState(residual={"a": torch.tensor([0.25, 0.25]), "b": torch.zeros(2), "gone": torch.ones(3)})
    ctx = _reply_ctx("fp32", True)
    arrays, residual, own = delta_reply(ctx.spec.strategy, trained, base, saved, ["b"])
    sent = decode_delta(arrays, base, ctx.spec.strategy.uplink)
    assert sent["a"].tolist() == [0.75, -0.75]  # 0.5 + 0.25, -1.0 + 0.25
    assert sent["b"].tolist() == [0.5, -0.5, 0.0]  # its residual had another shape: dropped
    assert set(residual) == {"a", "b"} and all(not r.any() for r in residual.values())  # lossless: none left
    assert set(own) == {"b"} and own["b"].tolist() == [0.5, -0.5, 0.0]
    off_ctx = _reply_ctx("fp32", False)
    arrays_off, off, _ = delta_reply(off_ctx.spec.strategy, trained, base, saved, [])
    assert off == {}  # error feedback off: no residual kept ...
    assert decode_delta(arrays_off, base, off_ctx.spec.strategy.uplink)["a"].tolist() == [0.5, -1.0]  # ... none added


def test_int8_uplink_residual_is_what_quantisation_left_out():
    from client_app.delta_sync import delta_reply
    from common.codec import decode_delta

    torch.manual_seed(0)
    base = {"w": torch.randn(4, 64)}
    trained = {"w": base["w"] + 0.01 * torch.randn(4, 64)}
    ctx = _reply_ctx("int8", True)
    arrays, residual, own = delta_reply(ctx.spec.strategy, trained, base, None, ["w"])
    sent = decode_delta(arrays, base, ctx.spec.strategy.uplink)["w"]
    diff = trained["w"] - base["w"]
    assert not torch.equal(sent, diff)  # int8 is lossy here
    assert torch.equal(residual["w"], diff - sent) and torch.equal(own["w"], sent)


def _copy_state(step: int) -> NodeState:
    base = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0, 2.0, 2.0])}
    return NodeState(global_step=step, base=base, residual={"a": torch.ones(2)})


def test_a_round_starts_from_the_state_it_continues(tmp_path):
    """Which saved copy a delta-sync round continues: on a full resync the state at the round's
    start (the kept one in memory first), else the newest one before it, its residual cleared; on
    a delta, the state at the message's base step (step 0 included) with the moves applied."""
    from client_app.local_round import DeltaDownlink, NeedsFullModel, _delta_start
    from client_app.resident import ResidentNode

    ctx = _reply_ctx("fp32", True, partition=3)
    expected = {"a": torch.zeros(2), "b": torch.zeros(3)}
    whole = to_record({"a": np.full(2, 5.0, np.float32), "b": np.full(3, 6.0, np.float32)})
    moves = to_record(encode_delta({"a": torch.tensor([0.5, -0.5])}, Codec("fp32", 64)))
    root = tmp_path / "state"
    for step in (4, 8):
        _copy_state(step).save(root)
    tensors, saved = _delta_start(ctx, DeltaDownlink(whole, -1, False), expected, True, 8, root, None)
    assert saved.global_step == 8 and saved.residual == {} and tensors["a"].tolist() == [5.0, 5.0]
    _, saved = _delta_start(ctx, DeltaDownlink(whole, -1, False), expected, True, 12, root, None)
    assert saved.global_step == 8  # the node missed a round: its newest state before the start
    kept = ResidentNode(None, None, {}, None, _copy_state(10))  # in memory, not (yet) on disk
    _, saved = _delta_start(ctx, DeltaDownlink(whole, -1, False), expected, True, 10, root, kept)
    assert saved is kept.state

    tensors, saved = _delta_start(ctx, DeltaDownlink(moves, 8, False), expected, False, 8, root, None)
    assert saved.global_step == 8 and tensors["a"].tolist() == [1.5, 0.5] and tensors["b"].tolist() == [2.0] * 3
    tensors, saved = _delta_start(ctx, DeltaDownlink(moves, 10, False), expected, False, 10, root, kept)
    assert saved is kept.state and tensors["a"].tolist() == [1.5, 0.5]
    _copy_state(0).save(tmp_path / "first")
    tensors, saved = _delta_start(ctx, DeltaDownlink(moves, 0, False), expected, False, 0, tmp_path / "first", None)
    assert saved.global_step == 0 and tensors["a"].tolist() == [1.5, 0.5]
    with pytest.raises(NeedsFullModel, match="partition 3: no saved copy of the model at step 6"):
        _delta_start(ctx, DeltaDownlink(moves, 6, False), expected, False, 6, root, None)
    nan = to_record({"a": np.array([np.nan, 0.0], np.float32), "b": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="partition 3: received a with NaN"):
        _delta_start(ctx, DeltaDownlink(nan, -1, False), expected, True, 8, root, None)


def test_a_round_continues_a_kept_state_that_is_not_on_disk(tmp_path):
    """A node kept in memory continues from its kept state even when no copy is on disk (its
    save still under way, or lost): for a sparse downlink and for a delta."""
    from client_app.local_round import DeltaDownlink, RoundOrder, _start
    from client_app.resident import ResidentNode

    expected = {"a": torch.zeros(2), "b": torch.zeros(3)}
    state = _copy_state(10)
    state.owned, state.owned_tensors = [1], {"b": torch.tensor([7.0, 7.0, 7.0])}
    kept = ResidentNode(None, None, {}, None, state)
    sparse = RoundOrder(owned=[1], full_model=False, start_step=10, steps=2)
    start = _start(_reply_ctx("fp32", True), sparse, {"a": torch.ones(2)}, expected, tmp_path / "empty", kept)
    assert (
        start.saved is state and start.tensors["b"].tolist() == [7.0] * 3 and start.tensors["a"].tolist() == [1.0] * 2
    )
    moves = to_record(encode_delta({"a": torch.tensor([0.5, -0.5])}, Codec("fp32", 64)))
    delta = RoundOrder(owned=[1], full_model=False, start_step=10, steps=2, delta=DeltaDownlink(moves, 10, False))
    start = _start(_reply_ctx("fp32", True), delta, {}, expected, tmp_path / "empty", kept)
    assert start.saved is state and start.tensors["a"].tolist() == [1.5, 0.5]
