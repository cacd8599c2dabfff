"""`pip install .` (not editable) gives a working app: the wheel holds every package, the config tree,
the templates and the lm-eval task, and a run works from the installed copy alone.

The wheel is built without network (hatchling comes with the dev extras) and installed with
`--target` into a folder of its own; the checks run from outside the checkout, with that folder
first on the path, and assert that every module came from it. The other installed packages (torch,
Flower, ...) are this environment's: installing them again would add minutes and test pip."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp.glob("spes_flower-*.whl")
    target = tmp / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    return wheel, target, tmp


def _run(target: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_holds_every_package_and_the_data_files(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if n.endswith("/__init__.py")} == set(PACKAGES)
    for data in (
        "conf/config.yaml",
        "conf/model/tiny.yaml",
        "bench/templates/benchmarks.md.j2",
        "evaluation/tasks/spes_heldout/spes_heldout.yaml",
    ):
        assert data in names, data


def test_every_package_imports_from_the_installed_copy(installed):
    _, target, tmp = installed
    code = (
        "import importlib, json, sys\n"
        f"names = {PACKAGES!r}\n"
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))\n"
    )
    proc = _run(target, tmp, "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(Path(f).is_relative_to(target) for f in files.values()), files


def test_a_run_works_from_the_installed_copy(installed):
    """The in-process engine on a micro model: the config tree, data, model, node and coordinator all
    come from the wheel."""
    _, target, tmp = installed
    micro = [
        "nodes=2",
        "rounds=1",
        "strategy.local_steps=2",
        "model.hidden_size=32",
        "model.expert_ffn=16",
        "model.num_layers=1",
        "model.num_experts=4",
        "strategy.merge.enabled=false",
        "data.vocab_size=300",
        "data.seq_len=32",
        "train.batch_size=2",
        "eval.max_batches=1",
        "engine=inprocess",
        "run_name=wheel",
        f"output_dir={tmp}/out",
    ]
    proc = _run(target, tmp, "-m", "sim", *micro, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp / "out" / "wheel" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["tokens_trained"] == 2 * 2 * 2 * 32
    assert (tmp / "out" / "wheel" / "model" / "config.json").exists()
