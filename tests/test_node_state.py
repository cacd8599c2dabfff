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
