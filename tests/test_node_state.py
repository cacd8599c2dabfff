"""What a node keeps between rounds (client_app/node_state.py): saved, kept, recovered, refused."""

import json

import pytest
import torch

from client_app.node_state import NodeState, optimizer_tensors, recover_replaced, restore_optimizer, saved_steps


def _state(step, **extra):
    g = torch.Generator().manual_seed(step)
    return NodeState(
        global_step=step,
        owned=[2, 5],
        stream={"epoch": 1, "index": 40 + step},
        owned_tensors={"e2.w": torch.randn(3, 4, generator=g), "e5.w": torch.randn(3, 4, generator=g)},
        optimizer={"e2.w::exp_avg": torch.randn(3, 4, generator=g), "e2.w::step": torch.tensor(7.0)},
        **extra,
    )


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_saved_state_loads_back_whole(tmp_path):
    state = _state(10, base={"b": torch.ones(2)}, residual={"r": torch.full((2,), 0.5)})
    path = state.save(tmp_path)
    assert path == tmp_path / "step-000000000010"
    # Delta-sync files only where they hold tensors: own_delta was empty.
    assert sorted(p.name for p in path.iterdir()) == [
        "base.safetensors",
        "meta.json",
        "optimizer.safetensors",
        "owned.safetensors",
        "residual.safetensors",
    ]
    back = NodeState.load(tmp_path, 10)
    assert (back.global_step, back.owned, back.stream) == (10, [2, 5], {"epoch": 1, "index": 50})
    for key in ("owned_tensors", "optimizer", "base", "residual", "own_delta"):
        assert _equal(getattr(back, key), getattr(state, key)), key
    assert NodeState.load(tmp_path, 11) is None  # exactly that step, or nothing


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_the_newest_states_are_kept(tmp_path, keep):
    for step in (5, 30, 12, 40):
        _state(step).save(tmp_path, keep=keep)
    assert saved_steps(tmp_path) == [5, 12, 30, 40][-keep:]
    assert NodeState.load(tmp_path, 40).stream["index"] == 80


def test_saving_a_step_again_replaces_it_and_leaves_nothing_aside(tmp_path):
    _state(3).save(tmp_path)
    again = _state(3)
    again.owned_tensors = {"e2.w": torch.zeros(3, 4)}
    (tmp_path / ".tmp-99-dead").mkdir()  # left by a crash mid-save: cleared by the next save
    (tmp_path / ".tmp-98-odd").write_text("")  # not a directory: it cannot stop a save either
    again.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-98-odd", "step-000000000003"]
    assert _equal(NodeState.load(tmp_path, 3).owned_tensors, {"e2.w": torch.zeros(3, 4)})


def test_a_state_moved_aside_by_a_cut_short_save_is_put_back(tmp_path):
    _state(4).save(tmp_path)
    (tmp_path / "step-000000000004").rename(tmp_path / ".replaced-step-000000000004")
    assert saved_steps(tmp_path) == [4]  # put back before listing
    assert _equal(NodeState.load(tmp_path, 4).owned_tensors, _state(4).owned_tensors)
    # When the new state did land, the one aside is the stale copy: dropped, the new one kept.
    _state(6).save(tmp_path)
    (tmp_path / ".replaced-step-000000000006").mkdir()
    recover_replaced(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000004", "step-000000000006"]
    recover_replaced(tmp_path / "absent")  # no directory: nothing to do


def _damage_size(d):
    with open(d / "owned.safetensors", "ab") as fh:
        fh.write(b"\0")


def _damage_step(d):
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "global_step": 99}))


def _damage_moments(d):
    NodeState(global_step=8, optimizer={"e2.w::exp_avg": torch.tensor([1.0, float("nan")])}).save(d.parent)


def _damage_meta(d):
    (d / "meta.json").write_text("{")


@pytest.mark.parametrize("damage", [_damage_size, _damage_step, _damage_moments, _damage_meta])
def test_a_damaged_state_is_discarded_not_loaded(tmp_path, damage):
    directory = _state(8).save(tmp_path)
    damage(directory)
    assert NodeState.load(tmp_path, 8) is None
    assert not directory.exists()


def test_non_finite_names_the_first_bad_tensor():
    state = _state(1, residual={"r": torch.tensor([0.0, float("inf")])})
    assert state.non_finite() == "residual/r"
    state.optimizer["e2.w::exp_avg"][0, 0] = float("nan")
    assert state.non_finite() == "optimizer/e2.w::exp_avg"
    assert _state(1).non_finite() is None
    trained = _state(1)
    trained.owned_tensors["e5.w"][1, 2] = float("-inf")
    assert trained.non_finite() == "owned_tensors/e5.w"


def _trained(params):
    opt = torch.optim.AdamW(params, lr=0.1)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt


def test_optimizer_moments_by_name_move_to_a_new_set_of_trainable_parameters():
    a, b, frozen = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3)), torch.ones(1)
    opt = _trained([a, b])
    saved = optimizer_tensors(opt, {a: "a", b: "b"})
    assert set(saved) == {f"{n}::{s}" for n in "ab" for s in ("step", "exp_avg", "exp_avg_sq")}
    assert torch.equal(saved["a::exp_avg"], opt.state[a]["exp_avg"])
    assert set(optimizer_tensors(opt, {a: "a"})) == {"a::step", "a::exp_avg", "a::exp_avg_sq"}  # b unnamed
    assert set(optimizer_tensors(opt, {b: "b"})) == {"b::step", "b::exp_avg", "b::exp_avg_sq"}  # a unnamed
    doubled = optimizer_tensors(opt, {a: "a"}, whole=lambda t: t * 2)
    assert torch.equal(doubled["a::exp_avg"], 2 * opt.state[a]["exp_avg"])

    # The next round trains `a` again and a new `c`; `b` is frozen now: only `a` gets its moments.
    a2, b2 = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    c = torch.nn.Parameter(torch.zeros(4))
    new = torch.optim.AdamW([a2, c], lr=0.1)
    assert restore_optimizer(new, {"a": a2, "b": b2, "c": c, "frozen": frozen}, saved) == 1
    assert set(new.state) == {a2}
    assert all(torch.equal(new.state[a2][k], opt.state[a][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_moments_take_their_parameters_dtype_and_the_step_stays_a_float32_scalar():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3))
    opt = _trained([a, b])
    # A state for a parameter this node no longer has comes first: it is skipped, not the end.
    saved = {"gone::exp_avg": torch.ones(5), **optimizer_tensors(opt, {a: "a", b: "b"})}
    a64 = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    b64 = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    new = torch.optim.AdamW([a64, b64])
    assert restore_optimizer(new, {"a": a64, "b": b64}, saved) == 2
    for p64, p32 in ((a64, a), (b64, b)):
        moments = new.state[p64]
        assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.float64
        assert torch.equal(moments["exp_avg"], opt.state[p32]["exp_avg"].double())
        assert moments["step"].dtype == torch.float32 and moments["step"].shape == () and float(moments["step"]) == 1


@pytest.mark.parametrize(
    ("value", "kind"), [(0.5, "float"), (torch.nn.Parameter(torch.ones(1)), "Parameter")], ids=["float", "subclass"]
)
def test_only_plain_tensor_moments_are_saved(value, kind):
    a = torch.nn.Parameter(torch.ones(2))
    opt = _trained([a])
    opt.state[a]["extra"] = value
    with pytest.raises(TypeError, match=f"optimizer state a.extra is a {kind}, not a plain tensor"):
        optimizer_tensors(opt, {a: "a"}, whole=lambda t: t.requires_grad_(t.requires_grad))  # tensors only


def test_restoring_moments_of_the_wrong_shape_is_refused():
    a = torch.nn.Parameter(torch.ones(2, 2))
    saved = optimizer_tensors(_trained([a]), {a: "a"})
    other = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match=r"a\.exp_avg has shape \(2, 2\), parameter has \(4,\)"):
        restore_optimizer(torch.optim.AdamW([other]), {"a": other}, saved)


def test_removing_a_tree_that_is_gone_or_not_a_directory_is_no_error(tmp_path):
    from client_app.node_state import remove_tree

    (tmp_path / "step" / "inner").mkdir(parents=True)
    remove_tree(tmp_path / "step")
    remove_tree(tmp_path / "step")  # gone already: another process removed it
    (tmp_path / "file").write_text("x")
    remove_tree(tmp_path / "file")  # the OS refuses: left for a later cleanup
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


# -- what a delta-sync node sends, and its overlap (client_app/delta_sync.py), by hand --------------
def test_delta_reply_adds_the_decayed_residual_and_keeps_what_the_codec_dropped():
    from client_app.delta_sync import delta_reply
    from common.codec import decode_delta
    from common.spec import StrategyConfig

    base = {"w": torch.tensor([1.0, 1.0]), "e": torch.tensor([0.0])}
    trained = {"w": torch.tensor([2.0, 0.0]), "e": torch.tensor([4.0])}
    saved = NodeState(residual={"w": torch.tensor([0.4, 0.8]), "e": torch.tensor([1.0, 1.0])})  # e: other shape
    for decay, want in ((1.0, [1.4, -0.2]), (0.5, [1.2, -0.6])):
        cfg = StrategyConfig(local_steps=2, delta_sync=True, uplink_codec="fp32", error_decay=decay)
        arrays, residual, own = delta_reply(cfg, trained, base, saved, ["e"])
        assert decode_delta(arrays, base, cfg.uplink)["w"].tolist() == pytest.approx(want)  # [1, -1] + decay x r
        assert own["e"].tolist() == [4.0] and residual["w"].abs().max() == 0  # fp32 drops nothing
    # bf16 keeps 8 bits of mantissa: 1 + 2^-9 is sent as 1, and the 2^-9 stays for the next round
    cfg = StrategyConfig(local_steps=2, delta_sync=True, uplink_codec="bf16", error_decay=0.5)
    trained = {"w": torch.tensor([2.0 + 2**-9, 1.0]), "e": torch.tensor([4.0])}
    _, residual, _ = delta_reply(cfg, trained, base, NodeState(residual={"w": torch.tensor([0.0, 0.5])}), [])
    assert residual["w"].tolist() == [2**-9, 0.0] and residual["e"].tolist() == [0.0]


def test_the_overlap_takes_last_rounds_fragment_from_the_global_copy_and_mixes_it_in_on_time():
    from client_app.delta_sync import fragment_globals, fragment_mixer
    from common.spec import StrategyConfig

    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3))]
    local = {n: torch.full((1,), float(i)) for i, n in enumerate([*names, "model.norm.weight", "lm_head.weight"])}
    base = {n: -local[n] for n in [*names, "model.norm.weight"]}  # the global copy lacks lm_head
    cfg = StrategyConfig(local_steps=5, fragments=3, fragment_overlap=2, fragment_mix=0.25)
    # 3 strided fragments: layer l in l mod 3, the embeddings in 0, the final norm and head in 2.
    assert fragment_globals(cfg, 1, local, base) == {n: base[n] for n in names[:2]}  # sent fragment 0 last
    assert fragment_globals(cfg, 0, local, base) == {n: base[n] for n in (names[3], "model.norm.weight")}
    assert fragment_globals(cfg, None, local, base) == {}
    assert fragment_globals(StrategyConfig(local_steps=5, fragments=3), 1, local, base) == {}
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    mix = fragment_mixer(cfg, {"p": param}, {"p": torch.tensor([3.0, 6.0])})
    mix(1)
    assert param.tolist() == [1.0, 2.0]  # not yet: the global value is still in flight
    mix(2)
    assert param.tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6]
    mix(3)
    assert param.tolist() == [2.5, 5.0] and fragment_mixer(cfg, {"p": param}, {}) is None
