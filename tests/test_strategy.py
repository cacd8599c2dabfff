"""SPES strategy logic on hand-built models and replies (no running Flower)."""

import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common import keys
from common.codec import decode, encode
from common.spec import MergeSchedule, StrategyConfig
from model.naming import expert_param_names, group_expert_params, shared_param_names
from strategy import OuterOptimizer, SpesStrategy, aggregate, contiguous_assignment, merge_experts

E, L, H, I = 8, 2, 6, 4


def toy_params(seed=0, experts=E):
    g = torch.Generator().manual_seed(seed)
    p = {"model.embed_tokens.weight": torch.randn(10, H, generator=g), "model.norm.weight": torch.randn(H, generator=g)}
    for layer in range(L):
        p[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(experts, H, generator=g)
        for e in range(experts):
            base = f"model.layers.{layer}.mlp.experts.{e}"
            p[f"{base}.gate_proj.weight"] = torch.randn(I, H, generator=g)
            p[f"{base}.up_proj.weight"] = torch.randn(I, H, generator=g)
            p[f"{base}.down_proj.weight"] = torch.randn(H, I, generator=g)
    return p


# -- assignment --------------------------------------------------------------------------
def test_contiguous_blocks_like_reference():
    own = contiguous_assignment(16, 4)
    assert own.owners == tuple(tuple(range(4 * p, 4 * p + 4)) for p in range(4))


def test_uneven_split_every_expert_one_owner():
    own = contiguous_assignment(10, 4)
    assert [len(o) for o in own.owners] == [3, 3, 2, 2]
    assert sorted(e for o in own.owners for e in o) == list(range(10))
    assert all(len(own.trainers_of(e)) == 1 for e in range(10))


def test_as_many_experts_as_nodes_gives_each_node_one():
    assert contiguous_assignment(4, 4).owners == ((0,), (1,), (2,), (3,))


def test_more_nodes_than_experts_rejected():
    with pytest.raises(ValueError, match="E >= N"):
        contiguous_assignment(3, 4)


# -- aggregation -------------------------------------------------------------------------
def test_experts_from_owner_shared_token_weighted():
    params = toy_params(0)
    own = contiguous_assignment(E, 2)
    updates = {}
    for p, tokens in ((0, 100.0), (1, 300.0)):
        trained = toy_params(p + 10)
        names = shared_param_names(params) + expert_param_names(params, own.experts_of(p))
        updates[p] = ({n: trained[n] for n in names}, tokens)

    def trainers(name):
        from model.naming import parse_expert_param

        e = parse_expert_param(name)
        return {0, 1} if e is None else set(own.trainers_of(e.expert))

    new = aggregate(params, updates, trainers, OuterOptimizer())
    for n in shared_param_names(params):
        expected = 0.25 * updates[0][0][n] + 0.75 * updates[1][0][n]
        torch.testing.assert_close(new[n], expected)
    for p in (0, 1):
        for n in expert_param_names(params, own.experts_of(p)):
            assert torch.equal(new[n], updates[p][0][n])


def test_three_copies_take_the_token_weighted_mean_by_default():
    params = {"w": torch.zeros(2), "kept": torch.full((2,), 7.0)}
    copies = {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([2.0, 30.0]), 2: torch.tensor([100.0, 3.0])}
    updates = {p: ({"w": c}, tokens) for (p, c), tokens in zip(copies.items(), (1.0, 2.0, 5.0))}
    new = aggregate(params, updates, lambda n: {0, 1, 2}, OuterOptimizer())
    # (1*1 + 2*2 + 5*100) / 8 and (0 + 2*30 + 5*3) / 8: neither a median nor a trimmed mean.
    torch.testing.assert_close(new["w"], torch.tensor([505 / 8, 75 / 8]))
    assert torch.equal(new["kept"], params["kept"])  # nobody sent it
    # From three copies on, the robust rules replace the weighted mean ...
    median = aggregate(params, updates, lambda n: {0, 1, 2}, OuterOptimizer(), median=True)
    torch.testing.assert_close(median["w"], torch.tensor([2.0, 3.0]))
    trimmed = aggregate(params, updates, lambda n: {0, 1, 2}, OuterOptimizer(), trim_fraction=0.34)
    torch.testing.assert_close(trimmed["w"], torch.tensor([2.0, 3.0]))  # one dropped per side
    # ... below three they cannot say which copy is the outlier: still the weighted mean.
    two = aggregate(params, updates, lambda n: {0, 1}, OuterOptimizer(), median=True, trim_fraction=0.34)
    torch.testing.assert_close(two["w"], torch.tensor([5 / 3, 20.0]))
    # A zero weight takes no share, fractions summing to 1 their shares: still the weighted mean.
    for weights, want in (((0.0, 2.0), [2.0, 30.0]), ((0.25, 0.75), [1.75, 22.5])):
        weighted = {p: (updates[p][0], w) for p, w in zip((0, 1), weights)}
        torch.testing.assert_close(
            aggregate(params, weighted, lambda n: {0, 1}, OuterOptimizer())["w"], torch.tensor(want)
        )
    # Weights that cannot weigh (NaN, negative, summing to nothing) fall back to the plain mean.
    for bad in ((math.nan, 2.0), (-1.0, 3.0), (0.0, 0.0)):
        unusable = {p: (updates[p][0], w) for p, w in zip((0, 1), bad)}
        plain = aggregate(params, unusable, lambda n: {0, 1}, OuterOptimizer())
        torch.testing.assert_close(plain["w"], torch.tensor([1.5, 15.0]), msg=str(bad))


def test_outer_nesterov_matches_formula():
    outer = OuterOptimizer(lr=0.7, momentum=0.9, nesterov=True)
    old, avg = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.5])
    delta = old - avg
    first = outer.step("w", old, avg)
    torch.testing.assert_close(first, old - 0.7 * (delta + 0.9 * delta))
    second = outer.step("w", first, avg)
    d2 = first - avg
    buf = 0.9 * delta + d2
    torch.testing.assert_close(second, first - 0.7 * (d2 + 0.9 * buf))


def test_outer_heavy_ball_and_plain_lr_by_hand():
    old, avg = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.5])  # pseudo-gradient [0.5, -0.5]
    heavy = OuterOptimizer(lr=1.0, momentum=0.5)  # lr 1 but momentum: not the plain average
    first = heavy.step("w", old, avg)
    torch.testing.assert_close(first, torch.tensor([0.5, 2.5]))  # buffer = the first pseudo-gradient
    second = heavy.step("w", first, torch.tensor([0.25, 2.75]))  # pseudo-gradient [0.25, -0.25]
    torch.testing.assert_close(second, torch.tensor([0.0, 3.0]))  # buffer 0.5 * 0.5 + 0.25 = 0.5
    torch.testing.assert_close(heavy.buffers["w"], torch.tensor([0.5, -0.5]))
    damped = OuterOptimizer(lr=0.4)
    torch.testing.assert_close(damped.step("w", old, avg), torch.tensor([0.8, 2.2]))
    assert damped.buffers == {}


# -- merging -----------------------------------------------------------------------------
def test_merge_matches_formula_by_hand():
    params = toy_params(1)
    # Gates of very different norms: a dot product would rank neighbours otherwise than cosine.
    for name in [n for n in params if n.endswith("gate_proj.weight")]:
        params[name] = params[name] * (1 + 7 * (int(name.split(".experts.")[1].split(".")[0]) % 3))
    alpha, k = 0.3, 2
    merged = merge_experts(params, alpha, k)
    for _layer, experts in group_expert_params(params).items():
        gates = {e: params[experts[e]["gate_proj"]].flatten() for e in experts}
        for i in experts:
            sims = {
                j: float(torch.nn.functional.cosine_similarity(gates[i], gates[j], dim=0)) for j in experts if j != i
            }
            top = sorted(sims, key=sims.get, reverse=True)[:k]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                theta_i = params[experts[i][proj]]
                expected = theta_i + alpha * sum(params[experts[j][proj]] - theta_i for j in top) / k
                torch.testing.assert_close(merged[experts[i][proj]], expected)
    assert not set(merged) & set(shared_param_names(params))


def test_merge_pairs_parameters_by_name_not_order():
    params = toy_params(2)
    # Same tensors, inserted in a scrambled order: pairing by position would mix projections.
    scrambled = dict(sorted(params.items(), key=lambda kv: hash(kv[0][::-1]) % 97))
    a, b = merge_experts(params, 0.2, 3), merge_experts(scrambled, 0.2, 3)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n])


def test_merge_uses_pre_merge_snapshot():
    params = toy_params(3)
    before = {k: v.clone() for k, v in params.items()}
    merge_experts(params, 0.5, 2)
    assert all(torch.equal(before[k], params[k]) for k in params)


def test_merge_schedule_alpha_and_interval():
    s = MergeSchedule(enabled=True, alpha_start=0.05, decay_steps=1000, interval=500, top_k=4)
    assert s.alpha(0) == 0.05 and s.alpha(500) == pytest.approx(0.025) and s.alpha(2000) == 0.0
    assert s.due(400, 500) and not s.due(500, 600) and s.due(450, 550)
    assert not s.due(900, 1000)  # alpha is 0 there: merging has stopped
    with pytest.raises(ValueError, match="top_k"):
        MergeSchedule(top_k=8).validate(8)
    with pytest.raises(ValueError, match="top_k=8 must be < number of experts"):
        merge_experts(toy_params(0), 0.1, E)  # every other expert plus itself: no k neighbours


# -- the strategy with hand-built replies ------------------------------------------------
def reply(msg, tensors, tokens, **extra):
    metrics = MetricRecord({"num-tokens": float(tokens), "train-loss": 1.0, **extra})
    return Message(RecordDict({"arrays": encode(tensors), "metrics": metrics}), reply_to=msg)


def run_round(strategy, rnd, arrays, tokens, tamper=None):
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({"run-token": "t"}), None))
    replies, sent = [], {}
    for p, msg in enumerate(msgs):
        received = decode(msg.content["arrays"])
        sent[p] = (received, msg.content["config"])
        trained = {n: t + (p + 1) * 0.01 for n, t in strategy.params.items()}
        names = shared_param_names(trained) + expert_param_names(trained, msg.content["config"]["owned-experts"])
        update = {n: trained[n] for n in names}
        if tamper and p in tamper:
            update = tamper[p](update)
        replies.append(reply(msg, update, tokens[p]))
    return msgs, sent, replies


def make_strategy(**cfg):
    merge = MergeSchedule(**cfg.pop("merge", {"enabled": False}))
    return SpesStrategy(StrategyConfig(local_steps=10, merge=merge, **cfg), E, {11: 1, 7: 0}, num_rounds=3)


def test_messages_per_node_and_bytes_analytic(flower_task):
    params = toy_params(0)
    s = make_strategy()
    total = sum(t.numel() * 4 for t in params.values())
    per_expert = sum(params[n].numel() * 4 for n in expert_param_names(params, [0]))
    shared = sum(params[n].numel() * 4 for n in shared_param_names(params))
    msgs, sent, replies = run_round(s, 1, encode(params), tokens=[100, 100])
    assert [m.metadata.dst_node_id for m in msgs] == [7, 11]  # ordered by partition id
    assert [list(c["owned-experts"]) for _, c in sent.values()] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(c["full-model"] for _, c in sent.values())  # first round: the full model
    s.aggregate_train(1, replies)
    rec = s.history[-1]
    for node in rec.nodes.values():
        assert node["bytes_down"] == total
        assert node["bytes_up"] == shared + 4 * per_expert
    # Second round: no merging, so a node gets shared + the experts it does not own.
    msgs, sent, replies = run_round(s, 2, None, tokens=[100, 100])
    assert not any(c["full-model"] for _, c in sent.values())
    assert set(sent[0][0]) == set(shared_param_names(params)) | set(expert_param_names(params, range(4, 8)))
    s.aggregate_train(2, replies)
    for node in s.history[-1].nodes.values():
        assert node["bytes_down"] == total - 4 * per_expert
    assert s.global_step == 20


def test_aggregate_train_owner_copy_and_weighted_mean(flower_task):
    params = toy_params(0)
    s = make_strategy()
    _, _, replies = run_round(s, 1, encode(params), tokens=[100, 300])
    updates = [decode(r.content["arrays"]) for r in replies]
    s.aggregate_train(1, replies)
    for n in shared_param_names(params):
        torch.testing.assert_close(s.params[n], 0.25 * updates[0][n] + 0.75 * updates[1][n])
    for p, experts in enumerate(([0, 1, 2, 3], [4, 5, 6, 7])):
        for n in expert_param_names(params, experts):
            assert torch.equal(s.params[n], updates[p][n])


def test_invalid_update_rejected_before_touching_model(flower_task):
    params = toy_params(0)
    s = make_strategy()

    def poison(update):
        name = next(iter(update))
        update[name] = torch.full_like(update[name], math.nan)
        return update

    _, _, replies = run_round(s, 1, encode(params), tokens=[100, 100], tamper={1: poison})
    good = decode(replies[0].content["arrays"])
    s.aggregate_train(1, replies)
    status = {k: v["status"] for k, v in s.history[-1].nodes.items()}
    assert status["0"] == "ok" and status["1"].startswith("rejected")
    assert all(torch.isfinite(t).all() for t in s.params.values())
    for n in shared_param_names(params):
        assert torch.equal(s.params[n], good[n])  # only the valid node's shared weights
    for n in expert_param_names(params, range(4, 8)):
        assert torch.equal(s.params[n], params[n])  # the rejected node's experts keep their value
    assert s.needs_full[1] and not s.needs_full[0]


def test_merge_round_sends_full_model_next(flower_task):
    params = toy_params(0)
    s = make_strategy(merge={"enabled": True, "alpha_start": 0.1, "decay_steps": 100, "interval": 10, "top_k": 2})
    _, _, replies = run_round(s, 1, encode(params), tokens=[100, 100])
    updates = [decode(r.content["arrays"]) for r in replies]
    s.aggregate_train(1, replies)
    alpha = s.history[-1].merge_alpha
    assert alpha == pytest.approx(0.1 * (1 - 10 / 100))
    pre = dict(params)
    for p, experts in enumerate(([0, 1, 2, 3], [4, 5, 6, 7])):
        pre.update({n: updates[p][n] for n in expert_param_names(params, experts)})
    expected = merge_experts(pre, alpha, 2)
    for n, t in expected.items():
        torch.testing.assert_close(s.params[n], t)
    _, sent, _ = run_round(s, 2, None, tokens=[100, 100])
    assert all(c["full-model"] for _, c in sent.values())


def test_state_dict_round_trip(flower_task):
    s = make_strategy()
    _, _, replies = run_round(s, 1, encode(toy_params(0)), tokens=[1, 1])
    s.aggregate_train(1, replies)
    state = s.state_dict()
    t = make_strategy()
    t.load_state_dict(state, s.outer_buffers())
    assert (t.round, t.global_step, t.owners) == (1, 10, s.owners)
    assert all(t.needs_full.values())  # after a restart nodes may have lost their state


def test_expert_load_reported_per_node_and_layer(flower_task):
    s = make_strategy()
    msgs = list(s.configure_train(1, encode(toy_params(0)), ConfigRecord({}), None))
    replies = []
    for p, msg in enumerate(msgs):
        names = shared_param_names(s.params) + expert_param_names(s.params, msg.content["config"]["owned-experts"])
        row = [1.0 / (p + 1)] * (p + 1) + [0.0] * (E - p - 1)  # node p spreads its tokens over p + 1 experts
        replies.append(reply(msg, {n: s.params[n] for n in names}, 10, **{"expert-load": row * L}))
    s.aggregate_train(1, replies)
    node1 = s.history[-1].nodes["1"]
    assert len(node1["expert_load"]) == L and all(row == [0.5, 0.5] + [0.0] * (E - 2) for row in node1["expert_load"])


# -- ownership and the round record as data ---------------------------------------------------
def test_ownership_round_trips_and_replicated_gives_everyone_everything():
    from strategy.assignment import Ownership, make_assignment, replicated_assignment

    own = contiguous_assignment(5, 2)
    assert own.to_dict() == {"num_experts": 5, "owners": [[0, 1, 2], [3, 4]]}
    assert Ownership.from_dict({"num_experts": "5", "owners": [["0", 1, 2], [3, 4]]}) == own
    rep = replicated_assignment(3, 2)
    assert rep.owners == ((0, 1, 2), (0, 1, 2)) and rep.trainers_of(1) == (0, 1)
    assert Ownership.from_dict(rep.to_dict()) == rep  # several trainers per expert: not exclusive
    assert replicated_assignment(3, 1).owners == ((0, 1, 2),)
    assert make_assignment("replicated", 3, 2) == rep and make_assignment("contiguous", 5, 2) == own
    with pytest.raises(ValueError, match="at least one node"):
        replicated_assignment(3, 0)
    with pytest.raises(ValueError, match="outside"):
        Ownership.from_dict({"num_experts": 2, "owners": [[0, 2], [1]]})
    with pytest.raises(ValueError, match="no owner"):
        Ownership.from_dict({"num_experts": 3, "owners": [[0], [1]]})
    with pytest.raises(ValueError, match="expert 1 has 2 owners; SPES needs exactly one"):
        Ownership(3, ((0, 1), (1, 2))).validate()


def test_round_record_counts_only_the_used_updates_and_reads_back_what_it_wrote():
    from strategy.round_record import RoundRecord

    bytes_ = {"bytes_up": 10, "bytes_down": 100, "wire_bytes_up": 11, "wire_bytes_down": 101}
    nodes = {
        0: {"status": "ok", "num_tokens": 100.0, "train_loss": 2.0, **bytes_},
        1: {"status": "ok", "num_tokens": 300.0, "train_loss": 4.0, **bytes_},
        2: {"status": "rejected: NaN", "num_tokens": 900.0, "train_loss": 9.0, **bytes_},
    }
    rec = RoundRecord.of_round(3, 30, nodes, used={0, 1}, applied=True, refused="")
    assert (rec.round, rec.global_step, rec.valid_updates, rec.applied) == (3, 30, 2, True)
    assert rec.tokens == 400.0 and rec.train_loss == (2.0 * 100 + 4.0 * 300) / 400  # 3.5
    assert (rec.bytes_up, rec.bytes_down, rec.wire_bytes_up, rec.wire_bytes_down) == (30, 300, 33, 303)
    assert set(rec.nodes) == {"0", "1", "2"} and rec.failed_nodes() == {"2": "rejected: NaN"}
    refused = RoundRecord.of_round(3, 30, nodes, used={0, 1}, applied=False, refused="below quorum")
    assert refused.tokens == 0.0 and refused.train_loss == 3.5  # trained, but nothing was applied
    assert math.isnan(RoundRecord.of_round(1, 0, nodes, used=set()).train_loss)
    # A used node that reports no token count weighs nothing, whatever loss it reports.
    silent = {**nodes, 3: {"status": "ok", "train_loss": 50.0, **bytes_}}
    weightless = RoundRecord.of_round(3, 30, silent, used={0, 1, 3}, applied=True)
    assert weightless.tokens == 400.0 and weightless.train_loss == 3.5
    # train-loss is optional: a node that reports none counts its tokens, not a loss of 0.
    quiet = {**nodes, 4: {"status": "ok", "num_tokens": 400.0, **bytes_}}
    partial = RoundRecord.of_round(3, 30, quiet, used={0, 1, 4}, applied=True)
    assert partial.tokens == 800.0 and partial.train_loss == 3.5
    line = rec.to_dict()
    assert "val_loss" not in line and line["tokens"] == 400.0 and line["nodes"]["2"]["status"] == "rejected: NaN"
    back = RoundRecord.from_dict({**line, "val_loss": None, "from_a_later_version": 1})
    assert back == rec
    assert RoundRecord(1, nodes={"5": {"bytes_up": 0}}).failed_nodes() == {"5": "?"}


def test_a_node_holding_only_its_experts_evaluates_the_model_as_it_holds_it(flower_task):
    s = make_strategy(residency="owned")
    s.aggregate_train(1, run_round(s, 1, encode(toy_params(0)), tokens=[100, 100])[2])
    msgs = list(s.configure_evaluate(3, encode(s.params), ConfigRecord({}), None))
    for m, own in zip(msgs, (range(4), range(4, 8)), strict=True):  # partition 0 (node 7) owns 0-3
        held = set(shared_param_names(s.params)) | set(expert_param_names(s.params, own))
        assert set(decode(m.content["arrays"])) == held
        assert list(m.content["config"][keys.ABSENT_EXPERTS]) == [int(e not in own) for _ in range(L) for e in range(E)]


def test_residency_sets_go_into_the_checkpoint_and_a_joining_nodes_ask_is_kept(flower_task):
    import json

    s = make_strategy(residency="owned")
    s.aggregate_train(1, run_round(s, 1, encode(toy_params(0)), tokens=[100, 100])[2])
    state = json.loads(json.dumps(s.state_dict()))  # as the checkpoint stores it
    assert state["residency"] == {"held": {"0": [[0, 1, 2, 3]] * L, "1": [[4, 5, 6, 7]] * L}}
    resumed = make_strategy(residency="owned")
    resumed.load_state_dict(state)
    assert resumed.residency.held == s.residency.held
    resumed.load_state_dict({k: v for k, v in state.items() if k != "residency"})  # older checkpoints
    assert resumed.residency.held == {}
    resumed.add_node(5, 2, "all")  # a large node in an owned run
    assert resumed.residency.asks == {2: None} and resumed.residency._extra(2) is None


def test_federated_evaluation_is_due_on_schedule_and_weighs_each_nodes_loss_by_its_tokens(flower_task):
    from common import keys
    from common.codec import payload_bytes

    every2 = make_strategy(federated_eval_every=2, router_bias_rate=0.01)  # num_rounds=3
    assert [every2.federated_eval_due(r) for r in (1, 2, 3, 4, 5, 6)] == [False, True, True, True, False, True]
    last_only = make_strategy()
    assert [last_only.federated_eval_due(r) for r in (1, 2, 3)] == [False, False, True]
    assert list(last_only.configure_evaluate(1, encode(toy_params(0)), ConfigRecord({}), None)) == []

    s = every2
    _, _, replies = run_round(s, 1, encode(toy_params(0)), tokens=[100, 100])
    rows = [[0.5, 0.5] + [0.0] * (E - 2)] * L
    for r in replies:
        r.content["metrics"]["expert-load"] = [x for row in rows for x in row]
    s.aggregate_train(1, replies)  # moves the router bias off zero
    arrays = encode(s.params, list(s.params)[:3])
    msgs = list(s.configure_evaluate(2, arrays, ConfigRecord({"run-token": "t"}), None))
    assert [m.metadata.dst_node_id for m in msgs] == [7, 11]
    for m in msgs:
        cfg = m.content["config"]
        assert cfg[keys.SERVER_ROUND] == 2 and cfg["run-token"] == "t"
        assert list(cfg[keys.ROUTER_BIAS]) == [b for row in s.router_bias for b in row]
        assert m.content["arrays"] is arrays

    def answer(msg, loss, tokens):
        return Message(RecordDict({"metrics": MetricRecord({"eval-loss": loss, "num-tokens": tokens})}), reply_to=msg)

    result = s.aggregate_evaluate(2, [answer(msgs[0], 2.0, 100.0), answer(msgs[1], 5.0, 300.0)])
    assert result["federated_eval_loss"] == pytest.approx((2.0 * 100 + 5.0 * 300) / 400)
    assert result["eval_bytes_down"] == 2 * payload_bytes(arrays)
    assert s.history[-1].federated_eval_loss is None  # the record of round 1 is not round 2's
    for rnd in (2, 3):
        _, _, replies = run_round(s, rnd, None, tokens=[100, 100])
        s.aggregate_train(rnd, replies)
    msgs = list(s.configure_evaluate(3, arrays, ConfigRecord({}), None))
    result = s.aggregate_evaluate(3, [answer(msgs[1], 3.0, 50.0)])  # one node answered
    assert result["federated_eval_loss"] == 3.0
    assert (s.history[-1].federated_eval_loss, s.history[-1].eval_bytes_down) == (3.0, 2 * payload_bytes(arrays))
    assert [r.federated_eval_loss for r in s.history[:-1]] == [None, None]  # only round 3's record
    assert s.aggregate_evaluate(3, [answer(msgs[0], -1.0, 50.0)]) is None  # nothing valid


def test_a_saved_state_reads_back_as_written_and_older_or_foreign_states_are_handled(flower_task):
    import json
    from dataclasses import asdict

    s = make_strategy()
    s.guard_score = lambda params: 2.0  # a flat guard loss: every round passes
    _, _, replies = run_round(s, 1, encode(toy_params(0)), tokens=[100, 100])
    s.aggregate_train(1, replies)
    s.configure_train(2, None, ConfigRecord({}), None)
    s.aggregate_train(2, [])  # nobody answered: refused, one failed round
    state = json.loads(json.dumps(s.state_dict()))
    assert (state["round"], state["global_step"], state["failed_rounds"]) == (2, 10, 1)
    assert state["guard_losses"] == [2.0, 2.0] and state["config"] == json.loads(json.dumps(asdict(s.cfg)))

    t = make_strategy()
    t.load_state_dict(state, s.outer_buffers())
    assert json.loads(json.dumps(t.state_dict())) == state and t.history == []
    older = {k: v for k, v in state.items() if k not in ("failed_rounds", "events", "guard_losses")}
    u = make_strategy()
    u.load_state_dict(older)
    assert (u.failed_rounds, u.events, u.guard_losses, u.owners) == (0, [], [], s.owners)

    alone = SpesStrategy(StrategyConfig(local_steps=10), E, {7: 0}, num_rounds=3)
    alone.load_state_dict(state)  # partition 1 did not come back: its experts need a live owner
    assert alone.owners == {0: tuple(range(E))} and alone.partitions == [0]
    assert alone.events[-1]["reason"] == "resumed with different nodes"
    orphan = json.loads(json.dumps(state))
    orphan["owners"]["1"] = [4, 5, 6]  # expert 7 owned by nobody in the saved state
    v = make_strategy()
    v.load_state_dict(orphan)
    assert sorted(e for p in v.partitions for e in v.owners[p]) == list(range(E))
    assert v.events[-1]["reason"] == "resumed with different nodes"
    uneven = json.loads(json.dumps(state))
    uneven["owners"] = {"0": [0, 1, 2, 3, 4], "1": [5, 6, 7]}  # as a load-aware policy may leave it
    w = make_strategy()
    w.load_state_dict(uneven)
    assert w.owners == {0: (0, 1, 2, 3, 4), 1: (5, 6, 7)} and w.events == state["events"]  # kept as saved
    delta = make_strategy(delta_sync=True)
    delta.initialize(s.params)
    delta.load_state_dict(state, s.outer_buffers())  # saved without delta sync: no downlink versions
    msgs = list(delta.configure_train(3, None, ConfigRecord({}), None))
    assert all(m.content["config"][keys.FULL_MODEL] and m.content["config"][keys.BASE_STEP] == -1 for m in msgs)
    foreign = json.loads(json.dumps(state))
    foreign["owners"]["1"] = [4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match=r"experts \[8\] outside \[0, 8\)"):
        make_strategy().load_state_dict(foreign)


@pytest.mark.parametrize(("num_layers", "accepted_rows"), [(None, L), (3, 3)])
def test_the_expert_load_has_one_row_per_layer_of_the_model(flower_task, num_layers, accepted_rows):
    # Without the model's layer count the strategy reads it from the expert parameters' names.
    s = SpesStrategy(StrategyConfig(local_steps=10), E, {7: 0, 11: 1}, num_rounds=3, num_layers=num_layers)
    msgs = list(s.configure_train(1, encode(toy_params(0)), ConfigRecord({}), None))
    replies = []
    for rows, msg in zip((accepted_rows, accepted_rows + 1), msgs):
        names = shared_param_names(s.params) + expert_param_names(s.params, msg.content["config"]["owned-experts"])
        replies.append(reply(msg, {n: s.params[n] for n in names}, 10, **{"expert-load": [1.0 / E] * E * rows}))
    s.aggregate_train(1, replies)
    status = {p: n["status"] for p, n in s.history[-1].nodes.items()}
    assert status["0"] == "ok" and status["1"].startswith("rejected")
