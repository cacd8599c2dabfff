"""Committed benchmark results and their docs name no machine: every path is relative.

Fast (no benchmark run): reads benchmarks/*.json and docs/*.md of this checkout and exercises
the functions the harness writes paths with.
"""

import json
import subprocess
from pathlib import Path

import pytest

from bench.runs import ROOT, absolute_paths, method_entry, portable_arg, relative_path

BENCH = ROOT / "benchmarks"


def results_files() -> list[Path]:
    """JSON under benchmarks/ that is committed or would be (tracked + untracked, not ignored)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "benchmarks/*.json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")
        files = [ROOT / f for f in listed if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:  # not a git checkout: every JSON outside the ignored runs/
        files = [p for p in BENCH.rglob("*.json") if "runs" not in p.relative_to(BENCH).parts]
    return sorted(files)


def test_committed_results_hold_no_absolute_path():
    files = results_files()
    assert BENCH / "results.json" in files and len(files) >= 2, files
    bad = {str(p.relative_to(ROOT)): absolute_paths(json.loads(p.read_text())) for p in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_committed_run_dirs_resolve_to_the_runs_folder():
    """Each run_dir of the benchmark and its ablations is relative to its file's folder and lands in
    benchmarks/runs/<run name> (studies keep no run_dir: a cell is its overrides)."""
    with_runs = [p for p in results_files() if p.name == "results.json" or p.parent.name == "ablations"]
    assert BENCH / "results.json" in with_runs
    for path in with_runs:
        res = json.loads(path.read_text())
        entries = res.get("methods") or res.get("variants") or {}
        assert entries, path
        for name, entry in entries.items():
            target = (path.parent / entry["run_dir"]).resolve()
            assert target.parent == BENCH / "runs", (path.name, name, entry["run_dir"])


def test_committed_docs_hold_no_absolute_path():
    for name in ("benchmarks.md", "results.md"):
        lines = (ROOT / "docs" / name).read_text().splitlines()
        assert [line for line in lines if absolute_paths(line)] == [], name


@pytest.mark.parametrize(
    "value",
    [
        "/srv/alice/spes/benchmarks/runs/bench-spes",
        "/opt/checkout/benchmarks",
        "~/runs",
        "C:\\Users\\bob",
        "python -m bench --out /var/scratch/bench",
        "output_dir=/mnt/x",
        "see (/srv/data)",
    ],
)
def test_absolute_paths_are_found(value):
    # Example roots outside the ones `git grep '/(root|home|work|tmp)/'` looks for, so the
    # repository-wide check for machine paths stays empty.
    assert absolute_paths({"a": [{"b": value}]}) == [("a[0].b", value)]


@pytest.mark.parametrize(
    "value",
    [
        "runs/bench-spes",
        "../runs/abl-H-H25",
        "model=tiny nodes=4",
        "up / round / node",
        "memory.spes.peak_rss_mb",
        "Linux-6.18-x86_64-with-glibc2.36",
        "2.13.0+cpu",
        "DiLoCo/FedAvg",
        "",
    ],
)
def test_relative_strings_are_not_flagged(value):
    assert absolute_paths({"k": value, "list": [value, 1.5, None]}) == []


def test_absolute_keys_are_found():
    assert absolute_paths({"x": {"/srv/u/a": 1}}) == [("x./srv/u/a", "/srv/u/a")]


def _fake_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    summary = {
        "first_val_loss": 9.0,
        "final_val_loss": 7.5,
        "val_loss_by_round": [9.0, 8.0, 7.5],
        "tokens_trained": 30,
        "peak_mem_mb_node": 100.0,
        "tokens_per_s_node": 5.0,
        "trainable_params_node": 10,
        "total_params": 20,
        "wall_s": 2.0,
        "bytes_up_per_round_node": 0,
        "bytes_down_per_round_node": 0,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "tokens": 10}\n{"round": 2, "tokens": 20}\n')


def test_method_entry_records_run_dir_relative_to_the_results_file(tmp_path):
    run_dir = tmp_path / "out" / "runs" / "bench-spes"
    _fake_run(run_dir)
    entry = method_entry(run_dir, None, tmp_path / "out")  # results.json's folder
    assert entry["run_dir"] == "runs/bench-spes"
    assert entry["tokens_by_round"] == [0.0, 10.0, 30.0]
    # an ablation JSON lives one folder down, in <out>/ablations/
    assert method_entry(run_dir, None, tmp_path / "out" / "ablations")["run_dir"] == "../runs/bench-spes"


def test_relative_path_is_posix_and_relative(tmp_path):
    assert relative_path(tmp_path / "a" / "b", tmp_path) == "a/b"
    assert relative_path(tmp_path / "a", tmp_path / "c" / "d") == "../../a"


def test_portable_arg_makes_project_paths_root_relative():
    assert portable_arg(str(ROOT / "benchmarks")) == "benchmarks"
    assert portable_arg(f"--out={ROOT / 'benchmarks' / 'x'}") == "--out=benchmarks/x"
    assert portable_arg(f"output_dir={ROOT}") == "output_dir=."
    assert portable_arg("model=tiny") == "model=tiny"
    assert portable_arg("--report-only") == "--report-only"
    outside = "/nonexistent-spes-scratch/out"
    assert portable_arg(outside) == outside  # outside the project: left as given
