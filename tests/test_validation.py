"""What a node sends is checked before it touches the global model (strategy/validation.py):
each rule at its boundary, the value just inside accepted, just outside refused."""

import dataclasses
import math

import pytest
import torch

from common.spec import MergeSchedule, StrategyConfig
from strategy.acceptance import accept_round
from strategy.outer import OuterOptimizer
from strategy.validation import (
    LOAD_ROW_TOLERANCE,
    MAX_TOKENS_PER_S,
    METRIC_MAX,
    InvalidUpdate,
    validate_eval_metrics,
    validate_train_metrics,
    validate_update,
)

REF = {"w": torch.tensor([3.0, -4.0]), "b": torch.zeros(3)}


def test_an_update_must_name_exactly_the_expected_tensors_with_their_shape_and_dtype():
    good = {"w": torch.tensor([3.5, -4.0]), "b": torch.ones(3)}
    validate_update(good, {"w", "b"}, REF)
    for update, message in (
        ({"w": good["w"]}, "1 expected parameter.s. missing .e.g. \\['b'\\]., 0 unexpected"),
        ({**good, "x": torch.ones(1)}, "0 expected parameter.s. missing .e.g. \\[\\]., 1 unexpected"),
        ({**good, "b": torch.ones(4)}, r"b: got \(4,\) torch.float32, expected \(3,\) torch.float32"),
        ({**good, "b": torch.ones(3, dtype=torch.float64)}, "b: got .* torch.float64, expected"),
        ({**good, "b": torch.tensor([0.0, math.nan, 0.0])}, "b: contains NaN or Inf"),
        ({**good, "b": torch.tensor([0.0, -math.inf, 0.0])}, "b: contains NaN or Inf"),
    ):
        with pytest.raises(InvalidUpdate, match=message):
            validate_update(update, {"w", "b"}, REF)


def test_largest_value_bound_is_inclusive_and_counts_negative_values():
    update = {"w": torch.tensor([2.0, -8.0])}
    validate_update(update, {"w"}, REF, max_abs_value=8.0)
    with pytest.raises(InvalidUpdate, match="w: largest value 8 exceeds 7.9"):
        validate_update(update, {"w"}, REF, max_abs_value=7.9)
    validate_update({"w": torch.tensor([1e9, 0.0])}, {"w"}, REF)  # 0 = no bound


def test_update_ratio_of_a_zero_tensor_is_against_a_tiny_norm():
    # ||ref|| = 0: any change beyond ratio * 1e-6 is refused rather than divided by zero.
    with pytest.raises(InvalidUpdate, match="b: change 1.73e-06 exceeds 0.5 x its norm 0"):
        validate_update({"b": torch.full((3,), 1e-6)}, {"b"}, REF, max_update_ratio=0.5)
    validate_update({"b": torch.full((3,), 2e-7)}, {"b"}, REF, max_update_ratio=0.5)  # 3.5e-7 <= 5e-7


def _train(**metrics):
    return {"num-tokens": 100.0, **metrics}


def test_train_metrics_come_back_typed_and_snake_cased():
    out = validate_train_metrics(_train(**{"train-loss": 4, "tokens-per-s": 12.5, "other": "x"}), 100.0, 1, 2)
    assert out == {"num_tokens": 100.0, "train_loss": 4.0, "tokens_per_s": 12.5}
    assert isinstance(out["train_loss"], float)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        (_train(**{"train-loss": -0.5}), "train-loss=-0.5 is negative"),
        (_train(**{"train-loss": True}), "train-loss=True is not a finite number"),
        (_train(**{"train-loss": "4"}), "train-loss='4' is not a finite number"),
        (_train(**{"train-loss": math.nan}), "train-loss=nan is not a finite number"),
        (_train(**{"peak-mem-mb": METRIC_MAX * 1.01}), "peak-mem-mb=.* is beyond 1e\\+15"),
        (_train(**{"tokens-per-s": MAX_TOKENS_PER_S * 1.01}), "tokens-per-s=1.01e\\+08 is beyond 1e\\+08"),
        ({"train-loss": 1.0}, "num-tokens missing"),
        (_train(**{"num-tokens": 0.0}), "num-tokens 0 is outside \\(0, 100\\]"),
        (_train(**{"num-tokens": 100.5}), "num-tokens 100.5 is outside \\(0, 100\\]"),
    ],
)
def test_train_metrics_refused_at_each_bound(metrics, message):
    with pytest.raises(InvalidUpdate, match=message):
        validate_train_metrics(metrics, 100.0, 1, 2)


def test_train_metrics_accepted_at_each_bound():
    edge = _train(**{"peak-mem-mb": METRIC_MAX, "tokens-per-s": MAX_TOKENS_PER_S, "aux-loss": 0.0})
    out = validate_train_metrics(edge, 100.0, 1, 2)
    assert (out["peak_mem_mb"], out["tokens_per_s"], out["aux_loss"]) == (METRIC_MAX, MAX_TOKENS_PER_S, 0.0)


def test_expert_load_is_rows_of_shares():
    out = validate_train_metrics(_train(**{"expert-load": [0.25, 0.75, 1.0, 0.0, 0.5, 0.5]}), 100.0, 3, 2)
    assert out["expert_load"] == [[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]]
    inside = 1.0 + LOAD_ROW_TOLERANCE * 0.9  # float32 rounding of shares is accepted
    validate_train_metrics(_train(**{"expert-load": [0.5, inside - 0.5]}), 100.0, 1, 2)
    for load, message in (
        ((0.5, 0.5), "must be a list of 1 x 2 numbers"),
        ([0.5, 0.5, 0.0], "must be a list of 1 x 2 numbers"),
        ([1.5, -0.5], "fractions outside \\[0, 1\\]"),
        ([1.5, 0.0], "fractions outside \\[0, 1\\]"),
        ([0.5, 0.5 + LOAD_ROW_TOLERANCE * 1.5], "each layer's shares must sum to 1"),
        ([0.5, 0.5 - LOAD_ROW_TOLERANCE * 1.5], "each layer's shares must sum to 1"),
        ([0.5, math.inf], "expert-load=inf is not a finite number"),
    ):
        with pytest.raises(InvalidUpdate, match=message):
            validate_train_metrics(_train(**{"expert-load": load}), 100.0, 1, 2)


def test_eval_metrics_at_their_bounds():
    assert validate_eval_metrics({"eval-loss": 0, "num-tokens": 50}, 50.0) == (0.0, 50.0)
    assert validate_eval_metrics({"eval-loss": 3.5, "num-tokens": 1}, 50.0) == (3.5, 1.0)  # one token counts
    for metrics, message in (
        ({"eval-loss": -1e-9, "num-tokens": 50}, "eval-loss -1e-09 is negative"),
        ({"eval-loss": 2.0, "num-tokens": 0}, "eval num-tokens 0 outside \\(0, 50\\]"),
        ({"eval-loss": 2.0, "num-tokens": 51}, "eval num-tokens 51 outside \\(0, 50\\]"),
        ({"num-tokens": 5}, "eval-loss=None is not a finite number"),
        ({"eval-loss": 2.0}, "num-tokens=None is not a finite number"),
    ):
        with pytest.raises(InvalidUpdate, match=message):
            validate_eval_metrics(metrics, 50.0)


# -- the nodes' evaluation replies (strategy/federated_eval.py) ---------------------------
def _eval_exchange(*replies):
    """Evaluate messages to nodes 11-14 (partitions 0-3, see `_partition_of`) and the replies
    `(node, content)`: content a (loss, tokens) pair, an error reason string, or a RecordDict as it came."""
    from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict

    from common import keys

    out = []
    for node, content in replies:
        sent = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.EVALUATE)
        if isinstance(content, str):
            out.append(Message(Error(code=1, reason=content), reply_to=sent))
            continue
        if isinstance(content, tuple):
            loss, tokens = content
            content = RecordDict({keys.METRICS: MetricRecord({keys.EVAL_LOSS: loss, keys.NUM_TOKENS: tokens})})
        out.append(Message(content, reply_to=sent))
    return out


def _partition_of(msg):
    return {11: 0, 12: 1, 13: 2, 14: 3}.get(msg.metadata.src_node_id)


def test_federated_loss_is_the_token_weighted_mean_of_the_valid_replies(flower_task):
    from flwr.app import RecordDict

    from strategy.federated_eval import federated_loss

    # Every reply left out comes before a valid one: leaving one out goes on to the next.
    replies = _eval_exchange(
        (99, (80.0, 100.0)),  # nobody's partition
        (13, "out of memory"),  # an error reply
        (11, (2.0, 100.0)),
        (11, (90.0, 100.0)),  # a second reply of partition 0: the first stands
        (12, (4.0, 300.0)),
    )
    # (2 x 100 + 4 x 300) / 400 by hand
    assert federated_loss(replies, _partition_of, max_tokens=1000.0) == (3.5, 400.0)
    for spoiled in ((5.0, 2000.0), (-1.0, 10.0), RecordDict({})):  # over the token bound, negative, no metrics
        got = federated_loss([*_eval_exchange((14, spoiled)), *replies], _partition_of, max_tokens=1000.0)
        assert got == (3.5, 400.0), spoiled
    only = _eval_exchange((14, (5.0, 1000.0)))  # the bound itself is a valid count
    assert federated_loss(only, _partition_of, max_tokens=1000.0) == (5.0, 1000.0)


def test_federated_loss_is_none_without_a_valid_reply(flower_task):
    from strategy.federated_eval import federated_loss

    assert federated_loss([], _partition_of, 1000.0) is None
    assert federated_loss(_eval_exchange((11, "failed"), (99, (1.0, 5.0))), _partition_of, 1000.0) is None


# -- clipping and the guard's reasons in accept_round ----------------------------------------
@pytest.mark.parametrize("kind", ["shared", "expert"])
def test_accept_round_clips_shared_and_expert_updates_each_by_its_own_factor(kind):
    # Four holders of one tensor (every node trains every expert when it is an expert's): three move it
    # by 1, one by 10; the median is 1, so at factor 2 the outlier is pulled back to norm 2.
    name = "w" if kind == "shared" else "model.layers.0.mlp.experts.0.up_proj.weight"
    params = {name: torch.zeros(1)}
    updates = {p: ({name: torch.tensor([10.0 if p == 3 else 1.0])}, 1.0) for p in range(4)}
    on = {"clip_shared": 2.0, "clip_experts": 0.0} if kind == "shared" else {"clip_shared": 0.0, "clip_experts": 2.0}
    cfg = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False), **on)
    out = accept_round(params, updates, lambda n: {0, 1, 2, 3}, OuterOptimizer(), cfg, 0, 1)
    assert out.clipped == {3: 1} and out.params[name].item() == pytest.approx((1 + 1 + 1 + 2) / 4)
    off = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False), clip_shared=0.0, clip_experts=0.0)
    plain = accept_round(params, updates, lambda n: {0, 1, 2, 3}, OuterOptimizer(), off, 0, 1)
    assert plain.clipped == {} and plain.params[name].item() == pytest.approx(13 / 4)


def test_the_guards_reason_names_clipping_and_disagreement_only_where_they_were():
    # Three nodes move w: 0 and 1 along x, 2 along y (orthogonal to the others' sum: cosine 0).
    # The guard loss is high exactly when node 2's update is in: it is dropped, unclipped, cosine 0.
    params = {"w": torch.zeros(2)}
    updates = {0: ({"w": torch.tensor([1.0, 0.0])}, 1.0), 1: ({"w": torch.tensor([1.0, 0.0])}, 1.0)}
    updates[2] = ({"w": torch.tensor([0.0, 1.0])}, 1.0)
    cfg = StrategyConfig(local_steps=10, merge=MergeSchedule(enabled=False), clip_shared=0.0)
    guard = (lambda c: 1.0 + 10 * float(c["w"][1]), [1.0, 1.0, 1.0])
    out = accept_round(params, updates, lambda n: {0, 1, 2}, OuterOptimizer(), cfg, 0, 1, guard)
    assert list(out.dropped) == [2] and out.cosine[2] == 0.0
    assert out.dropped[2].endswith("bar 1.02") and "clipped" not in out.dropped[2] and "cosine" not in out.dropped[2]


def test_a_merge_point_reaches_each_fragment_at_its_next_turn():
    """With F fragments a round's sync covers what its fragment trained since its last turn, the
    steps (global_step - (F - 1) H, global_step + H]: a merge point there is applied, once per fragment."""
    from faults.cases import _toy_params

    params = _toy_params(0)
    updates = {0: ({n: torch.zeros_like(t) for n, t in params.items()}, 1.0)}

    def merges(global_step: int, local_steps: int, fragments: int, interval: int) -> bool:
        merge = MergeSchedule(alpha_start=0.5, decay_steps=1000, interval=interval, top_k=1)
        cfg = StrategyConfig(local_steps=local_steps, merge=merge, delta_sync=True, fragments=fragments)
        return accept_round(params, updates, lambda n: {0}, OuterOptimizer(), cfg, global_step, 1).alpha > 0

    # H = 5, two fragments, merge points at 12, 24, 36: windows (0, 5], (0, 10], (5, 15], (10, 20], ...
    assert [merges(g, 5, 2, 12) for g in range(0, 40, 5)] == [False, False, True, True, True, True, False, True]
    assert merges(0, 1, 1, 1)  # a merge point every step: the first round's step 1 is one


# What a node trains on (client_app.local_round._data): its data is checked the same way.
def test_a_node_trains_on_its_own_disjoint_shard_or_on_all_of_its_own_data(tmp_path):
    from collections import Counter

    from client_app.local_round import NodeContext, _data
    from common.spec import from_dict
    from data import load_tokenizer, prepare_blocks
    from data.pipeline import node_shard
    from server_app.config import compose

    spec = from_dict(compose(["data.vocab_size=300", "data.seq_len=16"]))
    tok = load_tokenizer(spec.data, tmp_path / "data-cache")
    train, heldout = prepare_blocks(spec.data, tok, tmp_path / "data-cache")
    rows = lambda t: Counter(tuple(r) for r in t.tolist())  # noqa: E731
    shards = [_data(NodeContext(spec, tok, tmp_path / f"p{p}", p, 3, progress=False)) for p in range(3)]
    per, held_per = len(train) // 3, len(heldout) // 3
    assert all(len(s) == per and len(h) == held_per for s, h in shards)
    together = sum((rows(s) for s, _ in shards), Counter())
    assert not together - rows(train)  # every row of a shard is a training block, none dealt twice
    assert torch.equal(torch.cat([h for _, h in shards]), heldout[: 3 * held_per])  # held-out: in order
    many = _data(NodeContext(spec, tok, tmp_path / "p0", 0, len(heldout) + 1, progress=False))[1]
    assert torch.equal(many, heldout)  # fewer held-out blocks than nodes: every node scores them all
    last = _data(NodeContext(spec, tok, tmp_path / "p0", len(heldout) - 1, len(heldout), progress=False))[1]
    assert torch.equal(last, heldout[-1:])  # as many as nodes: one each

    own = tmp_path / "mine.txt"
    own.write_text("\n\n".join(f"Paragraph {i} of this institution's own text, with words." * 3 for i in range(60)))
    mine = NodeContext(spec, tok, tmp_path / "p2", 2, 3, data_source=str(own), progress=False)
    want, _ = prepare_blocks(dataclasses.replace(spec.data, source=str(own)), tok, tmp_path / "data-cache")
    assert torch.equal(_data(mine)[0], node_shard(want, 0, 1, spec.data.partition, spec.data.seed))


def test_a_fragment_round_takes_only_its_fragments_update_and_merges_only_its_layers(flower_task):
    """Two fragments, round 1 syncs fragment 0 (layer 0 and the embeddings): each node's update of
    exactly those is taken, fragment 1 does not move, and a merge due at the round touches layer 0's
    experts only. At round 2 (fragment 1) the same updates name tensors not expected."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from common import keys
    from common.codec import encode_delta, to_record
    from faults.cases import _toy_params
    from model.naming import expert_param_names, fragment_of, shared_param_names
    from strategy.spes import SpesStrategy

    merge = MergeSchedule(alpha_start=0.5, decay_steps=1000, interval=5, top_k=1)
    cfg = StrategyConfig(local_steps=5, merge=merge, delta_sync=True, fragments=2)
    s = SpesStrategy(cfg, 4, {10: 0, 11: 1}, num_rounds=3, num_layers=2)
    s.initialize(_toy_params(0))
    names, before = list(s.params), {n: t.clone() for n, t in s.params.items()}

    def replies(rnd: int) -> list[Message]:
        out = []
        for msg in s.configure_train(rnd, None, ConfigRecord({}), None):
            assert msg.content["config"][keys.SYNC_FRAGMENT] == rnd - 1
            p = msg.metadata.dst_node_id - 10
            mine = shared_param_names(names) + expert_param_names(names, s.experts_of(p))
            moves = {n: torch.full_like(s.params[n], 0.01 * (p + 1)) for n in mine if fragment_of(n, 2) == 0}
            metrics = MetricRecord({"num-tokens": 10.0})
            out.append(
                Message(
                    RecordDict({"arrays": to_record(encode_delta(moves, cfg.uplink)), "metrics": metrics}), reply_to=msg
                )
            )
        return out

    s.aggregate_train(1, replies(1))
    record = s.history[-1]
    assert record.applied and record.merge_alpha > 0 and record.fragment == 0
    assert all(torch.equal(s.params[n], before[n]) for n in names if fragment_of(n, 2) == 1)
    embed = "model.embed_tokens.weight"  # shared, fragment 0: the nodes' mean move, 0.015
    torch.testing.assert_close(s.params[embed], before[embed] + 0.015)
    layer0 = expert_param_names([n for n in names if fragment_of(n, 2) == 0], range(4))
    assert all(not torch.equal(s.params[n], before[n]) for n in layer0)  # each moved: owner's move, merge
    s.aggregate_train(2, replies(2))
    assert not s.history[-1].applied and s.history[-1].fragment == 1
    assert all("unexpected" in n["status"] for n in s.history[-1].nodes.values())
