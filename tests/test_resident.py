"""A node kept in memory between rounds trains exactly like one rebuilt from disk every round.

Real node rounds and the real SPES strategy, without Flower's runtime (micro model, 2 steps a
round): the same rounds played with train.resident=true and =false must leave bit-identical
global models and node states, for full and sparse downlinks, delta sync with int8 + error
feedback, LoRA and bf16 frozen experts. A round that does not continue where the kept node
ended (another node in the same process, other owned experts) must rebuild.
"""

import pytest
import torch
from strategy_rounds import play_round

from client_app import resident
from client_app.local_round import NodeContext, RoundOrder, run_local_round
from client_app.node_state import NodeState
from common.spec import from_dict
from model import build_model, expert_param_names
from model.lora import init_adapters, lora_args
from server_app.config import compose
from strategy.spes import SpesStrategy

E = 4
BASE = [
    "model.hidden_size=32",
    "model.expert_ffn=16",
    "model.num_layers=1",
    f"model.num_experts={E}",
    "strategy.merge.enabled=false",
    "data.vocab_size=300",
    "data.seq_len=16",
    "train.batch_size=2",
    "strategy.local_steps=2",
    "train.warmup_steps=0",
]
VARIANTS = {
    "plain": [],
    "delta-int8-ef": [
        "strategy.delta_sync=true",
        "strategy.uplink_codec=int8",
        "strategy.downlink_codec=int8",
        "strategy.error_feedback=true",
    ],
    "lora": ["train.lora_rank=2", "train.lora_alpha=4", "train.lora_targets='q_proj,v_proj'"],
    "bf16": ["train.precision=bf16"],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from data import load_tokenizer

    root = tmp_path_factory.mktemp("resident")
    return root, load_tokenizer(from_dict(compose(BASE + ["nodes=1"])).data, root / "cache")


@pytest.fixture(autouse=True)
def nothing_kept():
    resident.drop()
    yield
    resident.drop()


def federation(tokenizer, name, overrides, nodes=1):
    root, tok = tokenizer
    spec = from_dict(compose(BASE + [f"nodes={nodes}"] + overrides))
    ctxs = [NodeContext(spec, tok, root / f"{name}-node{p}", p, nodes, progress=False) for p in range(nodes)]
    lora = spec.train.lora_rank > 0
    model = build_model(spec.model, len(tok), seed=0)
    s = SpesStrategy(
        spec.strategy,
        E,
        {10 + p: p for p in range(nodes)},
        num_rounds=5,
        max_tokens=2 * 2 * 16,
        num_layers=1,
        lora=lora,
    )
    s.initialize(model.state_dict())
    if lora:
        s.params.update(init_adapters(model, lora_args(spec.train), seed=0))
    return ctxs, s


def play(s, rnd, ctxs):
    """One round; returns the `resident` metric of each node, by partition."""
    _, sent = play_round(s, rnd, ctxs)
    assert all(n["status"] == "ok" for n in s.history[-1].nodes.values()), s.history[-1].nodes
    for _, metrics in sent.values():
        assert metrics["round-seconds"] >= metrics["train-seconds"] > 0
    return {pid: metrics["resident"] for pid, (_, metrics) in sent.items()}


def saved(ctx, step):
    state = NodeState.load(ctx.workdir / "state", step)
    return {**state.optimizer, **state.owned_tensors, **state.base, **state.residual}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kept_node_equals_rebuilt_node(tokenizer, flower_task, variant):
    """Also: states written after the reply (the default) leave the same results as states written
    before it, whether the next round finds the node kept or rebuilds it from that state."""
    runs = {}
    for keep, background in ((True, True), (False, True), (False, False)):
        ctxs, s = federation(
            tokenizer,
            f"{variant}-{keep}-{background}",
            VARIANTS[variant]
            + [f"train.resident={str(keep).lower()}", f"train.save_in_background={str(background).lower()}"],
        )
        hits = [play(s, rnd, ctxs)[0] for rnd in (1, 2, 3)]
        runs[keep, background] = (s.params, saved(ctxs[0], 6), hits)
        resident.drop()
    fresh_params, fresh_state, fresh_hits = runs[False, False]
    assert fresh_hits == [0.0, 0.0, 0.0]
    for (keep, background), (params, state, hits) in runs.items():
        assert hits == ([0.0, 1.0, 1.0] if keep else [0.0, 0.0, 0.0]), (keep, background)
        assert params.keys() == fresh_params.keys()
        changed = [n for n in params if not torch.equal(params[n], fresh_params[n])]
        assert not changed, (keep, background, changed[:3])
        assert state.keys() == fresh_state.keys()
        assert all(torch.equal(state[k], fresh_state[k]) for k in state), (keep, background)


@pytest.mark.parametrize("budget_mb, round2_hits", [(1024, {0: 1.0, 1: 1.0}), (0, {0: 0.0, 1: 0.0})])
def test_two_nodes_in_one_process(tokenizer, flower_task, budget_mb, round2_hits):
    """Virtual nodes alternating in one process (a simulation actor): within the budget both stay
    kept; with none, each round finds only the other node kept and rebuilds. Either way the
    result equals rebuilding from disk."""
    params = {}
    for keep in (True, False):
        ctxs, s = federation(
            tokenizer,
            f"two-{budget_mb}-{keep}",
            [f"train.resident={str(keep).lower()}", f"train.resident_budget_mb={budget_mb}"],
            nodes=2,
        )
        hits = [play(s, rnd, ctxs) for rnd in (1, 2)]
        assert hits == [{0: 0.0, 1: 0.0}, round2_hits if keep else {0: 0.0, 1: 0.0}]
        assert resident.kept_partitions() == (([0, 1] if budget_mb else [1]) if keep else [])
        params[keep] = s.params
        resident.drop()
    assert all(torch.equal(params[True][n], params[False][n]) for n in params[True])


def _entry(pid, numel):
    model = torch.nn.Linear(numel, 1, bias=False)  # numel fp32 parameters
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, numel)).sum().backward()
    opt.step()  # two moments of numel fp32 each + a step scalar
    key = resident.ResidentKey(f"/w/{pid}", pid, "{}", "cpu")
    return resident.ResidentNode(key, model, {}, opt, NodeState(global_step=1, owned=[0]))


def test_budget_keeps_the_newest_and_older_nodes_that_fit():
    a, b, c = _entry(0, 1000), _entry(1, 1000), _entry(2, 1000)
    assert a.nbytes() == 3 * 4000 + 4  # weights + exp_avg + exp_avg_sq, and the fp32 step
    resident.keep(a, budget_bytes=30_000)
    resident.keep(b, budget_bytes=30_000)
    resident.keep(c, budget_bytes=30_000)  # the two older ones take 24,008 bytes: all fit
    assert resident.kept_partitions() == [0, 1, 2]
    resident.keep(_entry(3, 1000), budget_bytes=25_000)  # older ones 36,012 bytes: the oldest goes
    assert resident.kept_partitions() == [1, 2, 3]
    assert resident.take(b.key, 1, [0]) is b and resident.kept_partitions() == [2, 3]
    assert resident.take(c.key, 5, [0]) is None and resident.kept_partitions() == [3]  # stale: freed
    resident.keep(_entry(4, 10**6), budget_bytes=0)  # larger than any budget, kept as the newest
    assert resident.kept_partitions() == [4]


def test_other_owned_experts_or_step_rebuild(tokenizer, flower_task):
    root, tok = tokenizer
    spec = from_dict(compose(BASE + ["nodes=1"]))
    ctx = NodeContext(spec, tok, root / "owners-node0", 0, 1, progress=False)
    init = build_model(spec.model, len(tok), seed=0).state_dict()
    _, m = run_local_round(ctx, init, RoundOrder([0, 1], True, 0, 2), show_progress=False)
    assert m["resident"] == 0.0
    # The kept node ended at step 2 owning [0, 1]; a full round owning [0, 1, 2] must not reuse it
    # (expert 2 would stay frozen, with no optimizer state).
    reply, m = run_local_round(ctx, init, RoundOrder([0, 1, 2], True, 2, 2), show_progress=False)
    assert m["resident"] == 0.0
    assert set(expert_param_names(list(reply), [2])) and not torch.equal(
        reply["model.layers.0.mlp.experts.2.gate_proj.weight"], init["model.layers.0.mlp.experts.2.gate_proj.weight"]
    )
    # A repeated round (the coordinator restarted at step 2): the kept node is at step 4, so it rebuilds.
    _, m = run_local_round(ctx, init, RoundOrder([0, 1, 2], True, 2, 2), show_progress=False)
    assert m["resident"] == 0.0
    # Continuing where it ended (step 4, the same experts) reuses it.
    _, m = run_local_round(ctx, init, RoundOrder([0, 1, 2], True, 4, 2), show_progress=False)
    assert m["resident"] == 1.0
