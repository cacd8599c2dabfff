"""resume=true continues a run only with the settings it started with (but for how long and where it runs)."""

import contextlib
import io
import json

from micro import MICRO_MODEL

from engine.simulate import simulate

BASE = [
    *MICRO_MODEL,
    "model.num_experts=4",
    "nodes=2",
    "strategy.local_steps=2",
    "strategy.merge.enabled=false",
    "eval.max_batches=2",
    "engine=inprocess",
    "run_name=r",
]


def _sim(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = simulate(argv)
    return rc, out.getvalue() + err.getvalue()


def test_resume_refuses_other_settings_and_takes_more_rounds(tmp_path):
    out = f"output_dir={tmp_path}"
    assert _sim([*BASE, "rounds=1", out])[0] == 0
    rc, text = _sim([*BASE, "rounds=2", "train.lr=1e-4", "resume=true", out])
    assert rc == 1 and "resume=true with settings the run did not start with (train.lr: 0.003 -> 0.0001)" in text
    assert _sim([*BASE, "rounds=2", "resume=true", "logging.node_progress=true", out])[0] == 0
    made = json.loads((tmp_path / "r" / "run.json").read_text())
    assert made["config"]["rounds"] == 1 and len(made["resumes"]) == 1  # the start, then how it went on
    rounds = [json.loads(x)["round"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]


def test_a_resumed_diloco_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """DiLoCo's outer Nesterov momentum lives in the checkpoint: a resume that lost it would move
    the global model differently in round 2."""
    from safetensors.torch import load_file

    diloco = [*BASE, "strategy=diloco", "deterministic=true"]
    assert _sim([*diloco, "rounds=2", f"output_dir={tmp_path / 'straight'}"])[0] == 0
    resumed = f"output_dir={tmp_path / 'resumed'}"
    assert _sim([*diloco, "rounds=1", resumed])[0] == 0
    assert _sim([*diloco, "rounds=2", "resume=true", resumed])[0] == 0
    for name in ("params.safetensors", "outer.safetensors"):
        a = load_file(tmp_path / "straight" / "r" / "checkpoint" / "round-000002" / name)
        b = load_file(tmp_path / "resumed" / "r" / "checkpoint" / "round-000002" / name)
        assert a.keys() == b.keys() and a, name
        assert all(a[k].equal(b[k]) for k in a), (name, [k for k in a if not a[k].equal(b[k])][:3])
    outer = load_file(tmp_path / "resumed" / "r" / "checkpoint" / "round-000001" / "outer.safetensors")
    assert any(float(v.abs().max()) > 0 for v in outer.values())  # there was momentum to lose


def test_the_coordinator_moves_an_earlier_run_aside_instead_of_failing(tmp_path):
    """`flwr run` twice with one run_name (no python -m sim in front to move the folder): the
    coordinator keeps the earlier run under <run>.<timestamp> and starts afresh."""
    from engine import inprocess
    from engine.simulate import node_environment
    from server_app.config import load

    out = f"output_dir={tmp_path}"
    assert _sim([*BASE, "rounds=1", out])[0] == 0
    first = (tmp_path / "r" / "run.json").read_bytes()
    spec = load([*BASE, "rounds=1", out])
    summary = inprocess.run(spec, node_environment(spec, tmp_path / "r"))
    assert summary["rounds"] == 1
    (moved,) = [p for p in tmp_path.iterdir() if p.name.startswith("r.")]
    assert (moved / "run.json").read_bytes() == first and (moved / "checkpoint" / "round-000001").is_dir()
    assert "resumes" not in json.loads((tmp_path / "r" / "run.json").read_text())  # a new run, not a resume


def test_a_resumed_run_with_partial_residency_ends_where_an_uninterrupted_one_does(tmp_path):
    """With partial residency the nodes hold only some experts; the checkpoint keeps the sets
    chosen (owned+1 in round 1: the lowest other id, kept for 100 rounds) and a resume resyncs
    the nodes, so round 2 moves the global model as without the stop; the exported model (every
    expert) loads in stock transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    owned = [*BASE, "strategy.residency=owned+1", "strategy.assignment_every=100", "deterministic=true"]
    owned.append("strategy.delta_sync=true")
    assert _sim([*owned, "rounds=2", f"output_dir={tmp_path / 'straight'}"])[0] == 0
    resumed = f"output_dir={tmp_path / 'resumed'}"
    assert _sim([*owned, "rounds=1", resumed])[0] == 0
    assert _sim([*owned, "rounds=2", "resume=true", resumed])[0] == 0
    a = load_file(tmp_path / "straight" / "r" / "checkpoint" / "round-000002" / "params.safetensors")
    b = load_file(tmp_path / "resumed" / "r" / "checkpoint" / "round-000002" / "params.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])][:3]
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(n["absent_share"] > 0 for n in r["nodes"].values()) for r in lines] == [[True, True]] * 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "r" / "model")
    experts = model.model.layers[0].mlp.experts
    assert model.config.num_experts == 4 and experts.gate_up_proj.shape[0] == 4
    assert experts.down_proj.abs().sum(dim=(1, 2)).gt(0).all()  # every expert exported, absent nowhere
