"""python -m client_app.clean: a node's run folders listed with their real sizes; old ones removed,
busy ones and folders that are not runs left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from client_app.clean import human, main, run_folders

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400


def _run(root: Path, name: str, files: dict[str, int], age_days: float) -> Path:
    """A run folder with files of the given byte sizes, everything in it `age_days` old."""
    for rel, size in files.items():
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    stamp = time.time() - age_days * DAY
    for dirpath, dirs, names in os.walk(root / name):
        for entry in [*dirs, *names, "."]:
            os.utime(Path(dirpath) / entry, (stamp, stamp))
    return root / name


def _work_root(tmp_path: Path) -> Path:
    root = tmp_path / "nodes"
    state = "partition-1/state/step-000000000040"
    _run(root, "old-run", {f"{state}/owned.safetensors": 3000, "partition-1/tokenizer.json": 100}, 9)
    _run(root, "new-run", {"partition-0/state/step-000000000008/owned.safetensors": 50}, 0)
    (root / "notes").mkdir()  # not a run's folder (no partition-<i>)
    (root / "notes" / "keep.txt").write_text("mine")
    return root


def test_listing_reports_each_runs_size_age_and_newest_state(tmp_path):
    runs = run_folders(_work_root(tmp_path))
    assert [r.path.name for r in runs] == ["old-run", "new-run"]  # oldest first; notes/ is not a run
    old, new = runs
    assert (old.size_bytes, old.last_step, old.partitions) == (3100, 40, ["partition-1"])
    assert (new.size_bytes, new.last_step) == (50, 8)
    assert human(3100) == "3.0 KiB" and human(512) == "512 B" and human(5 * 2**30) == "5.0 GiB"


def test_older_than_removes_only_old_runs_and_busy_ones_are_kept_unless_forced(tmp_path, capsys):
    root = _work_root(tmp_path)
    assert main(["--work-dir", str(root), "--older-than", "7"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["new-run", "notes"]
    assert "removed old-run (3.0 KiB)" in capsys.readouterr().out
    assert main(["--work-dir", str(root), "--remove", "new-run"]) == 1  # touched just now: in use
    assert (root / "new-run").is_dir() and "maybe in use" in capsys.readouterr().out
    assert main(["--work-dir", str(root), "--remove", "new-run", "--force"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["notes"]


def test_an_unknown_run_is_an_error_and_nothing_is_removed(tmp_path, capsys):
    root = _work_root(tmp_path)
    assert main(["--work-dir", str(root), "--remove", "old-run", "notes"]) == 2
    assert "no run folder notes here" in capsys.readouterr().err
    assert (root / "old-run").is_dir()


def test_command_line_lists_from_the_node_environment(tmp_path):
    root = _work_root(tmp_path)
    env = {**os.environ, "SPES_NODE_WORK_DIR": str(root)}
    res = subprocess.run(
        [sys.executable, "-m", "client_app.clean"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "old-run" in res.stdout and "2 run(s), 3.1 KiB in all" in res.stdout
