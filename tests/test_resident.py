"""A node kept in memory between rounds trains exactly like one rebuilt from disk every round.

Real node rounds and the real SPES strategy, without Flower's runtime (micro model, 2 steps a
round): the same rounds played with train.resident=true and =false must leave bit-identical
global models and node states, for full and sparse downlinks, delta sync with int8 + error
feedback, LoRA and bf16 frozen experts. A round that does not continue where the kept node
ended (another node in the same process, other owned experts) must rebuild.
"""

import math
import time

import pytest
import torch
from strategy_rounds import play_round

from client_app import background_save, resident
from client_app.local_round import NeedsFullModel, NodeContext, RoundOrder, run_local_round
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
    sent, m = run_local_round(ctx, init, RoundOrder([0, 1, 2], True, 2, 2), show_progress=False)
    assert m["resident"] == 0.0
    before = {n: t.clone() for n, t in sent.items()}
    # Continuing where it ended (step 4, the same experts) reuses it; what it sent is a copy, which
    # the kept model's training does not move.
    _, m = run_local_round(ctx, init, RoundOrder([0, 1, 2], True, 4, 2), show_progress=False)
    assert m["resident"] == 1.0
    assert all(torch.equal(sent[n], before[n]) for n in sent)


# -- a node's round against what it must do, whether kept or rebuilt --------------------------
def _node(tokenizer, name, overrides=()):
    root, tok = tokenizer
    spec = from_dict(compose(BASE + ["nodes=1", *overrides]))
    return NodeContext(spec, tok, root / name, 0, 1, progress=False), build_model(spec.model, len(tok), seed=0)


def test_a_sparse_downlink_continues_exactly_like_the_full_model_with_the_nodes_own_experts(tokenizer, flower_task):
    (full, model), (sparse, _) = _node(tokenizer, "full-vs-sparse-a"), _node(tokenizer, "full-vs-sparse-b")
    init = model.state_dict()
    own = expert_param_names(list(init), [1, 2])
    first = {}
    for ctx in (full, sparse):
        first[ctx.workdir.name], _ = run_local_round(ctx, init, RoundOrder([1, 2], True, 0, 2), show_progress=False)
    # The coordinator's round-2 model: new shared weights, the node's own experts as it sent them.
    g = torch.Generator().manual_seed(5)
    global2 = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in init.items()}
    global2.update({n: first["full-vs-sparse-a"][n] for n in own})
    reply_full, _ = run_local_round(full, global2, RoundOrder([1, 2], True, 2, 2), show_progress=False)
    without_own = {n: t for n, t in global2.items() if n not in own}
    reply_sparse, _ = run_local_round(sparse, without_own, RoundOrder([1, 2], False, 2, 2), show_progress=False)
    assert reply_full.keys() == reply_sparse.keys()
    assert all(torch.equal(reply_full[n], reply_sparse[n]) for n in reply_full)
    # A sparse downlink needs the saved state of this very step and experts; else the full model.
    with pytest.raises(NeedsFullModel, match="no usable saved state at global step 6"):
        run_local_round(sparse, without_own, RoundOrder([1, 2], False, 6, 2), show_progress=False)
    others = {n: t for n, t in global2.items() if n not in expert_param_names(list(init), [1, 3])}
    with pytest.raises(NeedsFullModel, match="no usable saved state at global step 4"):
        run_local_round(sparse, others, RoundOrder([1, 3], False, 4, 2), show_progress=False)


def test_a_round_replies_what_the_node_trained_and_saves_where_it_ended(tokenizer, flower_task):
    ctx, model = _node(tokenizer, "what-it-trained")
    init = model.state_dict()
    called = time.perf_counter()
    reply, m = run_local_round(ctx, init, RoundOrder([3], True, 4, 2, total_steps=50), show_progress=False)
    assert m["round-seconds"] <= time.perf_counter() - called
    experts = expert_param_names(list(init), range(E))
    sent = [n for n in init if n not in experts or n in expert_param_names(list(init), [3])]
    assert sorted(reply) == sorted(sent)  # the shared weights and expert 3, nothing frozen
    assert m["trainable-params"] == sum(init[n].numel() for n in sent)
    assert m["num-tokens"] == 2 * 2 * 16  # 2 steps of 2 rows, 16 predicted tokens each
    assert m["round-seconds"] >= m["train-seconds"] > 0 and m["save-wait-seconds"] >= 0 and m["resident"] == 0.0
    assert all(reply[n].dtype == torch.float32 and reply[n].device.type == "cpu" for n in reply)
    background_save.drain()  # the state is written after the reply
    state = NodeState.load(ctx.workdir / "state", 6)
    assert (state.global_step, state.owned) == (6, [3])
    assert sorted(state.owned_tensors) == sorted(expert_param_names(list(init), [3]))
    assert all(torch.equal(state.owned_tensors[n], reply[n]) for n in state.owned_tensors)
    assert {k.split("::")[0] for k in state.optimizer} == set(sent)  # moments of what it trained only
    assert state.stream != NodeState().stream  # the data position moved on


@pytest.mark.parametrize(
    ("order", "why"),
    [
        (RoundOrder([0], True, -1, 2), r"bad round \(global step -1, 2 local steps\)"),
        (RoundOrder([0], True, 0, 0), r"bad round \(global step 0, 0 local steps\)"),
        (RoundOrder([0, 0], True, 0, 1), r"bad owned experts \[0, 0\]"),
        (RoundOrder([E], True, 0, 1), rf"bad owned experts \[{E}\]"),
        (RoundOrder([-1], True, 0, 1), r"bad owned experts \[-1\]"),
        (RoundOrder([0], True, 0, 1, absent=[[1], [2]]), r"bad absent experts \[\[1\], \[2\]\]"),  # 1 layer
        (RoundOrder([0], True, 0, 1, absent=[[0, 1]]), r"bad absent experts \[\[0, 1\]\] \(owned \[0\]\)"),
    ],
)
def test_a_malformed_order_is_refused_before_anything_is_built(tokenizer, order, why):
    ctx, model = _node(tokenizer, "malformed")
    with pytest.raises(ValueError, match=why):
        run_local_round(ctx, model.state_dict(), order, show_progress=False)
    assert not (ctx.workdir / "state").exists()


def test_the_smallest_valid_order_and_a_poisoned_model(tokenizer, flower_task):
    ctx, model = _node(tokenizer, "edges")
    init = model.state_dict()
    reply, _ = run_local_round(ctx, init, RoundOrder([E - 1], True, 0, 1), show_progress=False)
    assert expert_param_names(list(reply), [E - 1])
    poisoned = {**init, "model.norm.weight": torch.full_like(init["model.norm.weight"], math.nan)}
    with pytest.raises(
        ValueError, match="partition 0: received model.norm.weight with NaN or Inf; refusing to train on it"
    ):
        run_local_round(ctx, poisoned, RoundOrder([0], True, 1, 1), show_progress=False)
    short = {n: t for n, t in init.items() if n != "model.norm.weight"}
    with pytest.raises(RuntimeError, match=r"1 parameters missing, e.g. \['model.norm.weight'\]"):
        run_local_round(ctx, short, RoundOrder([0], True, 1, 1), show_progress=False)
    extra = {**init, "model.extra.weight": torch.zeros(2)}
    with pytest.raises(RuntimeError, match=r"1 unexpected parameters, e.g. \['model.extra.weight'\]"):
        run_local_round(ctx, extra, RoundOrder([0], True, 1, 1), show_progress=False)


def test_a_node_that_missed_rounds_continues_from_its_newest_state(tokenizer, flower_task):
    import shutil

    (ctx, model), (copy, _) = _node(tokenizer, "missed-a"), _node(tokenizer, "missed-b")
    init = model.state_dict()
    for step in (0, 2):
        run_local_round(ctx, init, RoundOrder([0], True, step, 2), show_progress=False)
    # ctx holds states at steps 2 and 4; copy holds only the one at 4; both are asked for step 8.
    background_save.drain()
    four = "step-000000000004"
    shutil.copytree(ctx.workdir / "state" / four, copy.workdir / "state" / four)
    a, _ = run_local_round(ctx, init, RoundOrder([0], True, 8, 2), show_progress=False)
    b, _ = run_local_round(copy, init, RoundOrder([0], True, 8, 2), show_progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    background_save.drain()
    assert NodeState.load(ctx.workdir / "state", 10).stream == NodeState.load(copy.workdir / "state", 10).stream
    fresh, _ = _node(tokenizer, "missed-c")
    c, _ = run_local_round(fresh, init, RoundOrder([0], True, 8, 2), show_progress=False)
    assert not all(torch.equal(a[n], c[n]) for n in a)  # the moments and data position did count


def test_a_round_sets_the_threads_and_determinism_it_is_told(tokenizer, flower_task):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        ctx, model = _node(tokenizer, "threads", ["train.threads=1", "deterministic=true"])
        run_local_round(ctx, model.state_dict(), RoundOrder([0], True, 0, 1), show_progress=False)
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def test_a_nodes_evaluation_is_the_held_out_loss_of_the_model_it_received(tokenizer):
    from client_app.local_round import run_local_eval
    from training.trainer import evaluate

    ctx, model = _node(tokenizer, "eval")
    g = torch.Generator().manual_seed(2)
    held = torch.randint(0, 300, (5, 17), generator=g)
    ctx.blocks = (held, held)
    spec = ctx.spec
    loss, tokens = run_local_eval(ctx, model.state_dict())
    assert (loss, tokens) == evaluate(model, held, spec.eval.batch_size, spec.eval.max_batches, torch.device("cpu"))
    bias = torch.zeros(1, E)
    bias[0, 3] = 10.0  # every token routed to expert 3 (and its second choice)
    biased, _ = run_local_eval(ctx, model.state_dict(), router_bias=bias)
    assert biased != loss


DELTA = ["strategy.delta_sync=true", "strategy.uplink_codec=int8", "strategy.downlink_codec=int8"]


def test_a_delta_downlink_is_refused_unless_it_applies_to_what_the_node_holds(tokenizer, flower_task):
    from client_app.local_round import DeltaDownlink
    from common.codec import Codec, encode_delta, to_record

    ctx, model = _node(tokenizer, "delta-refusals", DELTA + ["train.resident=false"])
    init = model.state_dict()
    whole = {n: t.numpy() for n, t in init.items()}

    def round_(arrays, full, start, base, apply_own, owned=(0,)):
        delta = DeltaDownlink(to_record(arrays), base, apply_own)
        return run_local_round(ctx, {}, RoundOrder(list(owned), full, start, 2, delta=delta), show_progress=False)

    first = "model.norm.weight"
    with pytest.raises(ValueError, match="a full resync must carry every tensor whole"):
        round_({n: a for n, a in whole.items() if n != first}, True, 0, -1, False)
    moved = {**{n: a for n, a in whole.items() if n != first}, **encode_delta({first: init[first]}, Codec("int8"))}
    with pytest.raises(ValueError, match="a full resync must carry every tensor whole"):
        round_(moved, True, 0, -1, False)  # one tensor as a move
    reply, _ = round_(whole, True, 0, -1, False)  # the node now holds the model as of step 0
    assert all("#" in name for name in reply)  # it answers with differences, never whole tensors
    background_save.drain()
    nothing = encode_delta({first: torch.zeros_like(init[first])}, Codec("int8"))
    with pytest.raises(NeedsFullModel, match="no saved copy of the model at step 99"):
        round_(nothing, False, 2, 99, False)
    with pytest.raises(NeedsFullModel, match="no saved copy of the model at step -1"):
        round_(nothing, False, 2, -1, False)
    round_(nothing, False, 2, 2, True)  # its own experts' last uplink is there to apply
    background_save.drain()
    round_(whole, True, 4, -1, False, owned=())  # a node owning no expert: nothing of its own to apply
    background_save.drain()
    with pytest.raises(NeedsFullModel, match="no saved copy of the model at step 6"):
        round_(nothing, False, 6, 6, True, owned=())


def test_a_node_trains_on_its_shard_of_the_common_data_or_on_all_of_its_own(tokenizer, tmp_path):
    import dataclasses

    from client_app.local_round import _data
    from data import node_shard, prepare_blocks

    ctx, _ = _node(tokenizer, "data")
    cfg, cache = ctx.spec.data, ctx.workdir.parent / "data-cache"
    train, heldout = prepare_blocks(cfg, ctx.tokenizer, cache)
    second = dataclasses.replace(ctx, partition_id=1, num_partitions=2)
    shard, held = _data(second)
    assert torch.equal(shard, node_shard(train, 1, 2, cfg.partition, cfg.seed))
    assert torch.equal(held, node_shard(heldout, 1, 2, "contiguous", cfg.seed))
    own = tmp_path / "own.txt"
    own.write_text("\n\n".join(" ".join(f"word{i % 97} text {d}" for i in range(300)) for d in range(10)))
    mine = dataclasses.replace(second, data_source=str(own))
    shard, held = _data(mine)
    all_train, all_held = prepare_blocks(dataclasses.replace(cfg, source=str(own)), ctx.tokenizer, cache)
    assert torch.equal(shard, node_shard(all_train, 0, 1, cfg.partition, cfg.seed))  # all of it, in its order
    assert torch.equal(held, all_held)


# Node evaluation (run_local_eval) lives here, among the files mutation testing runs.
def test_node_evaluation_uses_the_adapters(lora_shared):
    """With LoRA, a node scores the received model with its adapters, as peft's model with the
    adapters in its forward (not merged) scores it; a NaN received is refused naming the node."""
    from test_lora_round import make

    from client_app.local_round import _data, run_local_eval
    from model.lora import apply_lora
    from model.naming import plain_to_peft
    from training.trainer import evaluate

    spec, tok, ctxs, s = make(lora_shared, "eval", [])
    args = lora_args(spec.train)
    g = torch.Generator().manual_seed(5)
    params = {n: (torch.randn(t.shape, generator=g) if ".lora_" in n else t) for n, t in s.params.items()}
    loss, tokens = run_local_eval(ctxs[0], params)
    peft_model = apply_lora(build_model(spec.model, len(tok), seed=1), args)
    peft_model.load_state_dict({plain_to_peft(n, args.targets): t for n, t in params.items()}, strict=True)
    want, want_tokens = evaluate(
        peft_model, _data(ctxs[0])[1], spec.eval.batch_size, spec.eval.max_batches, torch.device("cpu")
    )
    assert tokens == want_tokens and loss == pytest.approx(want, rel=1e-5)
    base_only, _ = run_local_eval(ctxs[0], s.params)  # B = 0: the adapters change nothing yet
    assert abs(loss - base_only) > 1e-3
    bad = {**params, "model.norm.weight": torch.full_like(params["model.norm.weight"], math.nan)}
    with pytest.raises(ValueError, match="partition 1: received model.norm.weight with NaN"):
        run_local_eval(ctxs[1], bad)


@pytest.fixture(scope="module")
def lora_shared(tmp_path_factory):
    from test_lora_round import shared_setup

    return shared_setup(tmp_path_factory.mktemp("lora-eval"))


def test_a_lora_node_refuses_to_train_what_it_would_not_send(lora_shared):
    """With LoRA the coordinator accepts adapters, routers, norms and owned experts only: a model
    with anything else trainable (here the embeddings) is refused before training, not trained
    and then silently dropped."""
    from test_lora_round import make

    from client_app.local_round import _load, _round_model

    spec, tok, ctxs, s = make(lora_shared, "odd", [])
    owned = s.experts_of(0)
    model, plain = _round_model(ctxs[0], owned, torch.device("cpu"))
    tensors = {plain[n]: t for n, t in model.state_dict().items()}
    named = _load(ctxs[0], model, plain, tensors, owned)  # as built: exactly what is sent
    assert not named["model.embed_tokens.weight"].requires_grad
    named["model.embed_tokens.weight"].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"partition 0: trainable parameters differ from those sent: \['model.embed"):
        _load(ctxs[0], model, plain, tensors, owned)


def test_a_node_shows_its_step_bar_only_when_it_and_the_round_want_one(tokenizer, flower_task, capsys):
    """The per-step bar (what logging.node_progress and node-config progress decide): on stderr
    with the round's step range and count where the node shows progress, absent where it does
    not or where the caller says not to (the other ranks of a multi-GPU node). The ClientApp's
    train handler says nothing (None here): shown."""
    root, tok = tokenizer
    spec = from_dict(compose(BASE + ["nodes=1", "train.resident=false"]))
    init = build_model(spec.model, len(tok), seed=0).state_dict()
    shown = []
    for progress, show in ((True, True), (False, True), (True, False), (True, None)):
        ctx = NodeContext(spec, tok, root / f"bar-{progress}-{show}", 0, 1, progress=progress)
        run_local_round(ctx, init, RoundOrder([0, 1], True, 0, 2), **({} if show is None else {"show_progress": show}))
        shown.append(capsys.readouterr().err)
    assert "node 0 steps 0-2" in shown[0] and "2/2" in shown[0] and "node 0 steps 0-2" in shown[3]
    assert "node 0 steps" not in shown[1] and "node 0 steps" not in shown[2]


def test_a_kept_node_whose_state_on_disk_was_lost_continues_from_memory(tokenizer, flower_task):
    """Its state deleted between rounds, a kept node still continues a sparse downlink (its own
    experts from memory) instead of asking for the whole model."""
    import shutil

    ctx, model = _node(tokenizer, "lost-state", ["train.resident=true"])
    init = model.state_dict()
    run_local_round(ctx, init, RoundOrder([1, 2], True, 0, 2), show_progress=False)
    background_save.drain()
    shutil.rmtree(ctx.workdir / "state")
    without_own = {n: t for n, t in init.items() if n not in expert_param_names(list(init), [1, 2])}
    _, m = run_local_round(ctx, without_own, RoundOrder([1, 2], False, 2, 2), show_progress=False)
    assert m["resident"] == 1.0
