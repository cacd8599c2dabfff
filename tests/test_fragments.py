"""Streaming fragments (issue 26): one fragment of layers synced a round, in turn, through the real
strategy and real node rounds (tiny model, a few steps)."""

import pytest
import torch
from strategy_rounds import play_round

from client_app.local_round import NodeContext
from client_app.node_state import NodeState
from common import keys
from common.spec import from_dict
from model import build_model
from model.naming import fragment_names, fragment_of, synced_fragment
from server_app.config import compose
from strategy.spes import SpesStrategy

BASE = [
    "model.hidden_size=32",
    "model.expert_ffn=16",
    "model.num_layers=2",
    "model.num_experts=4",
    "strategy.merge.enabled=false",
    "data.vocab_size=300",
    "data.seq_len=16",
    "train.batch_size=2",
    "strategy.local_steps=2",
    "strategy.delta_sync=true",
]


def test_fragments_are_strided_over_layers_with_embeddings_first_and_head_last():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.experts.3.up_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.5.mlp.gate.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    assert [fragment_of(n, 3) for n in names] == [0, 0, 1, 2, 2, 2, 2]
    assert fragment_names(names, 1, 3) == ["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert [synced_fragment(r, 3) for r in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]


def _run(tmp_path, nodes: int, rounds: int, extra: list[str]):
    from data import load_tokenizer

    spec = from_dict(compose([*BASE, f"nodes={nodes}", *extra]))
    tok = load_tokenizer(spec.data, tmp_path / "cache")
    ctxs = [NodeContext(spec, tok, tmp_path / f"node{p}", p, nodes, progress=False) for p in range(nodes)]
    ids = {10 + p: p for p in range(nodes)}
    s = SpesStrategy(spec.strategy, 4, ids, num_rounds=rounds, max_tokens=2 * 2 * 16, num_layers=2)
    s.initialize(build_model(spec.model, len(tok), seed=0).state_dict())
    return s, ctxs


def _state(ctx) -> NodeState:
    root = ctx.workdir / "state"
    return NodeState.load(root, max(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-")))


def test_a_lone_node_trains_the_same_model_whatever_is_synced_when(tmp_path, flower_task):
    """One node: a sync only hands its own values back, so syncing one fragment a round must not
    change its training. A fragment synced at round 1 holds round 1's values; the other, and the
    node's own copy of the first, hold round 2's (a node that restarted unsynced layers from the
    global copy would lose round 1's training of them)."""
    plain, (ctx_plain,) = _run(tmp_path / "plain", 1, 2, [])
    split, (ctx_split,) = _run(tmp_path / "split", 1, 2, ["strategy.fragments=2"])
    after = []
    for rnd in (1, 2):
        play_round(plain, rnd, [ctx_plain])
        msgs, _ = play_round(split, rnd, [ctx_split])
        assert msgs[0].content["config"][keys.SYNC_FRAGMENT] == rnd - 1
        after.append({n: t.clone() for n, t in plain.params.items()})
    local = _state(ctx_split).local
    names = list(split.params)
    first, second = fragment_names(names, 0, 2), fragment_names(names, 1, 2)
    assert set(local) and set(local) <= set(first)  # all but the frozen experts of fragment 0

    def gap(got: dict, want: dict, among: list[str]) -> float:
        """Distance to `want` over how far round 2 moved: 0 = the same training, 1 = a round lost."""
        dist = sum(float((got[n] - want[n]).norm() ** 2) for n in among) ** 0.5
        return dist / sum(float((after[1][n] - after[0][n]).norm() ** 2) for n in among) ** 0.5

    assert gap(split.params, after[0], first) < 1e-4  # measured 0 and ~2e-7: float rounding of the copies
    assert gap(local, after[1], list(local)) < 1e-4
    assert gap(split.params, after[1], second) < 1e-4


MERGE = [
    "strategy.merge.enabled=true",
    "strategy.merge.interval=4",
    "strategy.merge.alpha_start=0.1",
    "strategy.merge.decay_steps=100",
    "strategy.merge.top_k=1",
]


@pytest.mark.parametrize("codec", ["fp32", "topk2"])
def test_each_round_sends_and_moves_only_its_fragment_and_copies_stay_equal(tmp_path, flower_task, codec):
    s, ctxs = _run(
        tmp_path,
        2,
        3,
        ["strategy.fragments=2", f"strategy.uplink_codec={codec}", f"strategy.downlink_codec={codec}", *MERGE],
    )
    names = list(s.params)
    for rnd in (1, 2, 3):
        before = {n: t.clone() for n, t in s.params.items()}
        _, sent = play_round(s, rnd, ctxs)
        assert s.history[-1].applied and all(n["status"] == "ok" for n in s.history[-1].nodes.values())
        fragment = set(fragment_names(names, synced_fragment(rnd, 2), 2))
        for reply, _ in sent.values():
            assert {k.partition("#")[0] for k in reply} <= fragment
        assert all(torch.equal(s.params[n], before[n]) for n in set(names) - fragment)
        assert any(not torch.equal(s.params[n], before[n]) for n in fragment)
        for ctx in ctxs:
            state = _state(ctx)
            assert all(torch.equal(state.base[n], s.sync.shadow[n]) for n in names)
            assert set(state.local).isdisjoint(fragment)
        assert s.history[-1].fragment == rnd - 1 - 2 * (rnd > 2)
    # Merge point step 4 (2 steps a round): round 2 merges fragment 1's experts, round 3 fragment 0's
    # (its last sync was before step 4); only synced layers move, as checked above.
    assert [r.merge_alpha > 0 for r in s.history] == [False, True, True]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.fragments=2", "strategy.delta_sync=false"], "needs strategy.delta_sync=true"),
        (["strategy.fragments=3"], r"strategy.fragments \(3\) is more than model.num_layers \(2\)"),
        (["strategy.fragments=0"], "strategy.fragments must be an integer >= 1"),
    ],
)
def test_bad_fragment_settings_are_refused_before_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        from_dict(compose([*BASE, *overrides]))


def test_fragment_overlap_mixes_the_last_fragment_in_after_its_steps():
    """Hand values: fragment 1 of 2 is this round's, so fragment 0 (layer 0) came back last round;
    after 2 steps it becomes 0.25 x own + 0.75 x global, and nothing else moves."""
    from client_app.delta_sync import fragment_globals, fragment_mixer

    cfg = from_dict(
        compose(
            [
                *BASE,
                "strategy.local_steps=3",
                "strategy.fragments=2",
                "strategy.fragment_overlap=2",
                "strategy.fragment_mix=0.25",
            ]
        )
    )
    cfg = cfg.strategy
    layer0, layer1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    local = {layer0: torch.tensor([4.0, 8.0]), layer1: torch.tensor([1.0, 1.0])}
    base = {layer0: torch.tensor([0.0, 4.0]), layer1: torch.tensor([9.0, 9.0])}
    delayed = fragment_globals(cfg, 1, local, base)
    assert list(delayed) == [layer0] and torch.equal(delayed[layer0], base[layer0])
    named = {n: torch.nn.Parameter(t.clone()) for n, t in local.items()}
    mix = fragment_mixer(cfg, named, delayed)
    mix(1)
    assert torch.equal(named[layer0], local[layer0])  # not yet
    mix(2)
    assert torch.equal(named[layer0].detach(), torch.tensor([1.0, 5.0]))  # 0.25 x (4, 8) + 0.75 x (0, 4)
    assert torch.equal(named[layer1].detach(), local[layer1])
    no_overlap = from_dict(compose([*BASE, "strategy.fragments=2"])).strategy
    assert fragment_globals(no_overlap, 1, local, base) == {} and fragment_mixer(no_overlap, named, {}) is None


def test_an_overlap_that_keeps_the_nodes_own_values_trains_as_without_one(tmp_path, flower_task):
    """A lone node: the global value of a fragment is its own value at the sync. Keeping its own
    (fragment_mix=1) after the overlap trains exactly as taking the global at once; taking the
    global after a step of its own (fragment_mix=0) drops that step for the fragment."""
    runs = {}
    for name, extra in (
        ("now", []),
        ("keep", ["strategy.fragment_overlap=1", "strategy.fragment_mix=1.0"]),
        ("global", ["strategy.fragment_overlap=1", "strategy.fragment_mix=0.0"]),
    ):
        s, (ctx,) = _run(tmp_path / name, 1, 3, ["strategy.fragments=2", *extra])
        for rnd in (1, 2, 3):
            play_round(s, rnd, [ctx])
            assert s.history[-1].applied
        runs[name] = (s.params, _state(ctx))
    names = list(runs["now"][0])
    moved = sum(float(t.norm() ** 2) for t in runs["now"][0].values()) ** 0.5

    def gap(a, b):
        return sum(float((a[n] - b[n]).norm() ** 2) for n in names) ** 0.5 / moved

    assert gap(runs["keep"][0], runs["now"][0]) < 1e-6
    assert gap(runs["global"][0], runs["now"][0]) > 1e-4
    # With the overlap the node keeps its own value of what it sent too (fragment 0 in round 3).
    keep, now = runs["keep"][1].local, runs["now"][1].local
    assert set(now) < set(keep) and set(keep) - set(now) <= set(fragment_names(names, 0, 2))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.fragment_overlap=1"], r"fragment_overlap > 0 needs strategy.fragments > 1"),
        (["strategy.fragments=2", "strategy.fragment_overlap=2"], r"fragment_overlap must be an integer in \[0, local"),
        (["strategy.fragments=2", "strategy.fragment_mix=1.5"], r"strategy.fragment_mix must be in \[0, 1\]"),
    ],
)
def test_bad_overlap_settings_are_refused_before_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        from_dict(compose([*BASE, *overrides]))


def test_error_feedback_carries_each_fragments_residual_to_its_next_sync(tmp_path, flower_task):
    """int8 uplink with error feedback, two fragments, a lone node (an overlap of 1 keeps every value
    it trained in the node's state, sent or not, to compare with). Each round, what is sent
    plus the new residual is the node's move since its copy plus the residual carried for that
    tensor; the residual of the fragment not sent waits, unchanged, for its next sync."""
    from common.codec import decode_delta

    codec = ["strategy.uplink_codec=int8", "strategy.error_feedback=true", "strategy.error_decay=1.0"]
    s, (ctx,) = _run(tmp_path, 1, 3, ["strategy.fragments=2", "strategy.fragment_overlap=1", *codec])
    carried: dict[str, torch.Tensor] = {}
    for rnd in (1, 2, 3):
        _, sent = play_round(s, rnd, [ctx])
        state, reply = _state(ctx), sent[0][0]
        names = {k.partition("#")[0] for k in reply}
        assert names == set(fragment_names(list(state.local), synced_fragment(rnd, 2), 2))
        assert set(state.residual) == names | set(carried)
        moved = decode_delta(reply, {n: state.base[n] for n in names}, s.cfg.uplink)
        for n in names:
            want = state.local[n] - state.base[n] + carried.get(n, torch.zeros(()))
            torch.testing.assert_close(moved[n] + state.residual[n], want, rtol=0, atol=1e-7)
        assert all(torch.equal(state.residual[n], carried[n]) for n in set(carried) - names)
        carried = dict(state.residual)
    assert any(r.abs().max() > 0 for r in carried.values())  # int8 left something out
