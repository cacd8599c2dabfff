"""Partial residency through the real strategy and real node rounds (issue 25): with
`strategy.residency=owned` a node holds, is sent and trains with only its own experts."""

import pytest
import torch
from strategy_rounds import play_round

from client_app.local_round import NodeContext
from client_app.node_state import NodeState
from common import keys
from common.spec import from_dict
from model import build_model
from model.naming import expert_param_names, parse_expert_param
from server_app.config import compose
from strategy.spes import SpesStrategy

E = 4
BASE = [
    "model.hidden_size=32",
    "model.expert_ffn=16",
    "model.num_layers=2",
    f"model.num_experts={E}",
    "model.top_k=2",
    "strategy.merge.enabled=false",
    "data.vocab_size=300",
    "data.seq_len=16",
    "train.batch_size=2",
    "strategy.local_steps=2",
    "nodes=2",
    "strategy.residency=owned",
]


@pytest.mark.parametrize(("delta", "policy"), [(True, "skip"), (False, "mask")])
def test_a_node_holds_and_is_sent_only_its_own_experts(tmp_path, flower_task, delta, policy):
    from data import load_tokenizer

    spec = from_dict(compose([*BASE, f"strategy.delta_sync={str(delta).lower()}", f"strategy.absent_policy={policy}"]))
    tok = load_tokenizer(spec.data, tmp_path / "cache")
    ctxs = [NodeContext(spec, tok, tmp_path / f"node{p}", p, 2, progress=False) for p in (0, 1)]
    s = SpesStrategy(spec.strategy, E, {10: 0, 11: 1}, num_rounds=3, max_tokens=2 * 2 * 16, num_layers=2)
    full = build_model(spec.model, len(tok), seed=0)
    s.initialize(full.state_dict())
    names = list(s.params)
    per_expert = sum(s.params[n].numel() for n in expert_param_names(names, [0]))  # both layers
    for rnd in (1, 2):
        msgs, _ = play_round(s, rnd, ctxs)
        record = s.history[-1]
        assert record.applied and all(n["status"] == "ok" for n in record.nodes.values())
        for m in msgs:
            p = m.metadata.dst_node_id - 10
            mine = set(s.experts_of(p))
            assert m.content["config"][keys.ABSENT_EXPERTS] == [int(e not in mine) for e in range(E)] * 2
            sent = {parse_expert_param(k.partition("#")[0]) for k in m.content["arrays"]}
            assert {e.expert for e in sent if e is not None} <= mine  # no other expert comes down
            node = record.nodes[str(p)]
            # Two of four experts held: the model lacks two experts' parameters in every layer.
            assert node["resident_params"] == sum(t.numel() for t in full.parameters()) - 2 * per_expert
            assert node["weight_mb"] == pytest.approx(node["resident_params"] * 4 / 2**20)
            share = node["absent_share"]
            assert share == 0.0 if policy == "mask" else 0.0 < share < 1.0
    # The nodes' own evaluation: each gets and scores the model as it holds it.
    from flwr.app import ConfigRecord
    from strategy_rounds import _absent

    from client_app.local_round import run_local_eval
    from common.codec import decode

    for m in s.configure_evaluate(3, None, ConfigRecord({}), None):
        p = m.metadata.dst_node_id - 10
        received = decode(m.content["arrays"])
        assert {e.expert for n in received if (e := parse_expert_param(n))} == set(s.experts_of(p))
        absent = _absent(m.content["config"][keys.ABSENT_EXPERTS], E)
        loss, tokens = run_local_eval(ctxs[p], received, None, absent)
        assert tokens > 0 and 0 < loss < 20
    if delta:  # the node's copy of the model is its resident part of the coordinator's
        for ctx in ctxs:
            root = ctx.workdir / "state"
            base = NodeState.load(root, max(int(q.name[5:]) for q in root.iterdir() if q.name.startswith("step-"))).base
            held = {e.expert for n in base if (e := parse_expert_param(n))}
            assert held == set(s.experts_of(ctx.partition_id))
            assert all(torch.equal(base[n], s.sync.shadow[n]) for n in base)


def test_owned_plus_k_holds_the_experts_its_tokens_used_most(tmp_path, flower_task):
    from data import load_tokenizer

    over = [*BASE, "strategy.residency=owned+1", "strategy.delta_sync=true", "strategy.assignment_every=1"]
    spec = from_dict(compose(over))
    tok = load_tokenizer(spec.data, tmp_path / "cache")
    ctxs = [NodeContext(spec, tok, tmp_path / f"node{p}", p, 2, progress=False) for p in (0, 1)]
    s = SpesStrategy(spec.strategy, E, {10: 0, 11: 1}, num_rounds=3, max_tokens=2 * 2 * 16, num_layers=2)
    s.initialize(build_model(spec.model, len(tok), seed=0).state_dict())
    play_round(s, 1, ctxs)
    # Round 1: no load reported yet, so each layer adds the lowest other id.
    assert s.residency.held == {0: [[0, 1, 2]] * 2, 1: [[0, 2, 3]] * 2}
    load = {p: s.history[-1].nodes[str(p)]["expert_load"] for p in (0, 1)}
    msgs, _ = play_round(s, 2, ctxs)
    for p in (0, 1):
        mine = set(s.experts_of(p))
        want = [
            sorted(mine | {max((e for e in range(E) if e not in mine), key=lambda e: (row[e], -e))}) for row in load[p]
        ]
        assert s.residency.held[p] == want
        sent = {parse_expert_param(k.partition("#")[0]) for k in msgs[p].content["arrays"]}
        assert all(e.expert in want[e.layer] for e in sent if e is not None)
    assert all(n["status"] == "ok" for n in s.history[-1].nodes.values())
    assert [e["event"] for e in s.events].count("residency") >= 2


def test_residency_settings_are_checked_before_training():
    for bad in ("some", "owned+0", "owned+x"):
        with pytest.raises(ValueError, match="strategy.residency must be all, owned or owned"):
            from_dict(compose([*BASE, f"strategy.residency={bad}"]))
    with pytest.raises(ValueError, match="strategy.absent_policy must be one of"):
        from_dict(compose([*BASE, "strategy.absent_policy=drop"]))
