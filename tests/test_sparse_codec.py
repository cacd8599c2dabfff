"""Top-k 2/4-bit differences (issue 26): hand-computed encodings, error feedback exact over rounds,
node and coordinator copies equal through real rounds, and hostile encodings refused with a reason."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from strategy_rounds import play_round

from client_app.local_round import NodeContext
from client_app.node_state import NodeState
from common import sparse
from common.codec import Codec, DecodeError, decode_delta, decode_sync, encode_delta, payload_bytes, to_record
from common.spec import from_dict
from model import build_model
from server_app.config import compose
from strategy.spes import SpesStrategy

CHUNK = [0.1, -4.0, 0.2, 3.0, 0.0, -0.5, 2.0, 1.0]


@pytest.mark.parametrize(("bits", "kept"), [(2, [-3.0, 3.0]), (4, [-3.75, 3.25])])
def test_a_chunk_keeps_its_k_largest_entries_at_the_level_of_their_bin(bits, kept):
    """k = 0.25 * 8 = 2 keeps -4 and 3; m = 4. 2 bits: -4 -> q 0 -> (0.5/2 - 1) * 4 = -3,
    3 -> floor(1.75 * 2) = 3 -> (3.5/2 - 1) * 4 = 3. 4 bits: q 0 -> -3.75, floor(1.75 * 8) = 14 -> 3.25."""
    codec = Codec(f"topk{bits}", chunk=8, fraction=0.25)
    t = {"w": torch.tensor(CHUNK)}
    back = decode_delta(encode_delta(t, codec), t, codec)["w"]
    assert back.tolist() == [0.0, kept[0], 0.0, kept[1], 0.0, 0.0, 0.0, 0.0]


def test_positions_travel_as_a_bitmap_or_a_list_whichever_is_smaller():
    # 4096 elements, k = 64: 64 positions of 12 bits (96 bytes) beat a 512-byte bitmap.
    listed = sparse.layout(4096, sparse.TopK(4096, 1 / 64, 2))[0]
    assert (listed.keep, listed.position_bits, listed.bitmap, listed.position_bytes()) == (64, 12, False, 96)
    # 64 elements, k = 16: 16 positions of 6 bits (12 bytes) lose to an 8-byte bitmap.
    mapped = sparse.layout(64, sparse.TopK(64, 0.25, 4))[0]
    assert (mapped.keep, mapped.bitmap, mapped.position_bytes()) == (16, True, 8)
    # 10000 elements in 4096-chunks: two full chunks and a last one of 1808 (k = ceil(1808 / 64) = 29).
    groups = sparse.layout(10000, sparse.TopK(4096, 1 / 64, 2))
    assert [(g.start, g.count, g.length, g.keep) for g in groups] == [(0, 2, 4096, 64), (8192, 1, 1808, 29)]
    # 2-bit values: 64 * 2 / 8 = 16 bytes a full chunk, ceil(29 * 2 / 8) = 8 the last; positions
    # 96, 96 and ceil(29 * 11 / 8) = 40; one scale a chunk.
    assert sparse.sizes(10000, sparse.TopK(4096, 1 / 64, 2)) == (16 + 16 + 8, 96 + 96 + 40, 3)


@pytest.mark.parametrize("codec", ["topk2", "topk4"])
@pytest.mark.parametrize("shape", [(3, 700), (4096 * 2 + 5,), (1,), (5, 1, 9)])
def test_round_trip_keeps_k_per_chunk_within_the_bound_and_drops_the_rest(codec, shape):
    c = Codec(codec, chunk=256, fraction=0.05)
    t = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    arrays = encode_delta({"w": t}, c)
    back = decode_delta(arrays, {"w": t}, c)["w"]
    flat, got = t.reshape(-1), back.reshape(-1)
    bits = c.topk.bits
    for g in sparse.layout(t.numel(), c.topk):
        for row in range(g.count):
            lo = g.start + row * g.length
            x, y = flat[lo : lo + g.length], got[lo : lo + g.length]
            top = set(torch.topk(x.abs(), g.keep).indices.tolist())
            assert set(torch.nonzero(y).reshape(-1).tolist()) <= top  # only the largest travel
            m = x.abs().max()
            idx = sorted(top)
            assert ((y[idx] - x[idx]).abs() <= m / 2**bits + 1e-6).all()
    value_bytes, index_bytes, scales = sparse.sizes(t.numel(), c.topk)
    assert payload_bytes(to_record(arrays)) == value_bytes + index_bytes + 4 * scales


def _ctx(codec: str, decay: float = 1.0) -> NodeContext:
    raw = compose(
        [
            "strategy.delta_sync=true",
            f"strategy.uplink_codec={codec}",
            "strategy.topk_chunk=64",
            "strategy.topk_fraction=0.05",
            f"strategy.error_decay={decay}",
        ]
    )
    return NodeContext(from_dict(raw), None, None, 0, 4, progress=False)


@pytest.mark.parametrize("codec", ["topk2", "topk4"])
def test_error_feedback_sends_every_difference_eventually(codec):
    """Over rounds, what was sent plus the residual left equals the sum of the differences."""
    from client_app.delta_sync import delta_reply

    ctx = _ctx(codec)
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 50, generator=g)}
    saved, total_sent, total_diff = None, torch.zeros(6, 50), torch.zeros(6, 50)
    for _ in range(5):
        trained = {"w": base["w"] + 0.01 * torch.randn(6, 50, generator=g)}
        arrays, residual, _ = delta_reply(ctx.spec.strategy, trained, base, saved, [])
        total_sent += decode_delta(arrays, base, ctx.spec.strategy.uplink)["w"]
        total_diff += trained["w"] - base["w"]
        saved = NodeState(residual=residual)
    assert saved.residual["w"].abs().sum() > 0  # top-k left something behind ...
    torch.testing.assert_close(total_sent + saved.residual["w"], total_diff, rtol=0, atol=1e-6)  # ... and lost nothing


def test_error_decay_scales_the_residual_before_it_is_added():
    from client_app.delta_sync import delta_reply

    ctx = _ctx("topk4", decay=0.5)
    base = {"w": torch.zeros(64)}
    trained = {"w": torch.zeros(64)}
    residual = torch.zeros(64)
    residual[7], residual[9] = 8.0, 1.0  # k = ceil(0.05 * 64) = 4: both kept; m = 4 after the decay
    arrays, left, _ = delta_reply(ctx.spec.strategy, trained, base, NodeState(residual={"w": residual}), [])
    sent = decode_delta(arrays, base, ctx.spec.strategy.uplink)["w"]
    # 4 -> q = 15 -> (15.5/8 - 1) * 4 = 3.75; 0.5 -> floor(1.125 * 8) = 9 -> (9.5/8 - 1) * 4 = 0.75
    assert (sent[7].item(), sent[9].item()) == (3.75, 0.75)
    assert (left["w"][7].item(), left["w"][9].item()) == (0.25, -0.25)


def test_node_copies_equal_the_coordinators_after_every_topk_round(tmp_path, flower_task):
    from data import load_tokenizer

    spec = from_dict(
        compose(
            [
                "model.hidden_size=32",
                "model.expert_ffn=16",
                "model.num_layers=1",
                "model.num_experts=4",
                "strategy.merge.enabled=false",
                "data.vocab_size=300",
                "data.seq_len=16",
                "train.batch_size=2",
                "nodes=2",
                "strategy.local_steps=2",
                "strategy.delta_sync=true",
                "strategy.uplink_codec=topk2",
                "strategy.downlink_codec=topk4",
                "strategy.topk_chunk=128",
            ]
        )
    )
    tok = load_tokenizer(spec.data, tmp_path / "cache")
    ctxs = [NodeContext(spec, tok, tmp_path / f"node{p}", p, 2, progress=False) for p in (0, 1)]
    s = SpesStrategy(spec.strategy, 4, {10: 0, 11: 1}, num_rounds=4, max_tokens=2 * 2 * 16, num_layers=1)
    s.initialize(build_model(spec.model, len(tok), seed=0).state_dict())
    for rnd in (1, 2, 3):
        msgs, _ = play_round(s, rnd, ctxs)
        assert s.history[-1].applied and all(n["status"] == "ok" for n in s.history[-1].nodes.values())
        for ctx in ctxs:
            root = ctx.workdir / "state"
            step = max(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-"))
            base = NodeState.load(root, step).base
            assert all(torch.equal(base[n], s.sync.shadow[n]) for n in s.params)
        if rnd > 1:  # moves of shared tensors in topk4, relayed experts in the owner's topk2
            kinds = {k.partition("#")[2] for m in msgs for k in m.content["arrays"]}
            assert kinds <= {"topk4", "topk4-index", "topk4-scale", "topk2", "topk2-index", "topk2-scale"}
            assert "topk2" in kinds and "topk4" in kinds
    assert any(not torch.equal(s.params[n], s.sync.shadow[n]) for n in s.params)  # the downlink residual


def _record(codec: Codec, t: torch.Tensor, **replace) -> ArrayRecord:
    arrays = encode_delta({"w": t}, codec)
    for kind, value in replace.items():
        arrays[f"w#{codec.name}{kind.replace('_', '-')}"] = value
    return to_record(arrays)


HOSTILE = {
    "short values": ({"": np.zeros(1, np.uint8)}, r"w#topk2: got \(1,\) uint8, expected \(2,\)"),
    "long index": ({"_index": np.zeros(10**4, np.uint8)}, r"w#topk2-index: got \(10000,\) uint8, expected"),
    "nan scale": ({"_scale": np.array([np.nan, 1.0], np.float32)}, "finite"),
    "negative scale": ({"_scale": np.array([1.0, -1.0], np.float32)}, ">= 0"),
    "scale as int": (
        {"_scale": np.array([1, 1], np.int32)},
        r"w#topk2-scale: got \(2,\) int32, expected \(2,\) float32",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_topk_arrays_are_refused_with_a_reason(case):
    codec = Codec("topk2", chunk=64, fraction=4 / 64)  # 100 elements: 64 (k 4) and 36 (k 3), 6-bit positions
    t = torch.randn(100)
    replace, reason = HOSTILE[case]
    with pytest.raises(DecodeError, match=reason):
        decode_sync(_record(codec, t, **replace), {"w": t}, codec)


def _positions(values: list[list[int]], width: int) -> np.ndarray:
    return np.concatenate([sparse._to_bits(np.array([row]), width).reshape(-1) for row in values])


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        ([[0, 5, 5, 9], [1, 2, 3]], "strictly ascending"),
        ([[9, 5, 1, 0], [1, 2, 3]], "strictly ascending"),
        ([[0, 1, 2, 3], [1, 2, 40]], ">= the chunk length 36"),
    ],
)
def test_positions_out_of_range_repeated_or_unsorted_are_refused(rows, reason):
    codec = Codec("topk2", chunk=64, fraction=4 / 64)
    t = torch.randn(100)
    index = np.concatenate([_positions([rows[0]], 6), _positions([rows[1]], 6)])
    with pytest.raises(DecodeError, match=reason):
        decode_sync(_record(codec, t, _index=index), {"w": t}, codec)


def test_a_bitmap_with_the_wrong_count_is_refused():
    codec = Codec("topk4", chunk=16, fraction=0.5)  # k = 8 of 16: an 2-byte bitmap beats 8 x 4 bits
    t = torch.randn(16)
    with pytest.raises(DecodeError, match="marks 9 positions, expected 8"):
        decode_sync(_record(codec, t, _index=np.array([0xFF, 0x01], np.uint8)), {"w": t}, codec)


def test_a_topk_delta_in_a_codec_not_agreed_or_mixed_is_refused():
    t = torch.randn(100)
    two, four = Codec("topk2", chunk=64), Codec("topk4", chunk=64)
    with pytest.raises(DecodeError, match="not a"):
        decode_sync(to_record(encode_delta({"w": t}, two)), {"w": t}, Codec("int8"))
    mixed = encode_delta({"w": t}, two)
    mixed["w#topk2-scale"] = encode_delta({"w": t}, four).pop("w#topk4-scale")
    mixed["w#topk4-scale"] = mixed.pop("w#topk2-scale")
    with pytest.raises(DecodeError, match="not a"):
        decode_sync(to_record(mixed), {"w": t}, (two, four))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.topk_chunk=0", "topk_chunk must be an integer >= 1"),
        ("strategy.topk_fraction=0", r"topk_fraction must be in \(0, 1\]"),
        ("strategy.topk_fraction=1.5", r"topk_fraction must be in \(0, 1\]"),
        ("strategy.error_decay=-0.1", r"error_decay must be in \[0, 1\]"),
    ],
)
def test_bad_topk_settings_are_refused_before_training(override, message):
    with pytest.raises(ValueError, match=message):
        from_dict(compose(["strategy.delta_sync=true", "strategy.uplink_codec=topk2", override]))


def test_a_hostile_topk_reply_is_refused_by_the_coordinator_and_changes_nothing(flower_task):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from common.spec import MergeSchedule, StrategyConfig
    from faults.cases import _toy_params
    from model.naming import expert_param_names, shared_param_names

    cfg = StrategyConfig(
        local_steps=5,
        merge=MergeSchedule(enabled=False),
        delta_sync=True,
        uplink_codec="topk2",
        downlink_codec="topk2",
        topk_chunk=64,
    )
    s = SpesStrategy(cfg, 4, {10: 0, 11: 1}, num_rounds=3, num_layers=2)
    s.initialize(_toy_params(0))
    before = {n: t.clone() for n, t in s.params.items()}
    msgs = list(s.configure_train(1, None, ConfigRecord({}), None))
    names = list(s.params)
    replies = []
    for p, msg in enumerate(msgs):
        up = shared_param_names(names) + expert_param_names(names, s.experts_of(p))
        arrays = encode_delta({n: torch.full_like(s.params[n], 0.01) for n in up}, cfg.uplink)
        key = next(k for k in arrays if k.endswith("#topk2-scale"))
        arrays[key] = np.full_like(arrays[key], np.inf)  # both nodes lie: no quorum of valid updates
        content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord({"num-tokens": 10.0})})
        replies.append(Message(content, reply_to=msg))
    s.aggregate_train(1, replies)
    record = s.history[-1]
    assert not record.applied
    assert all(n["status"].endswith("#topk2: scales must be finite and >= 0") for n in record.nodes.values())
    assert all(torch.equal(s.params[n], before[n]) for n in names)
