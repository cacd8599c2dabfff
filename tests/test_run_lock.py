"""One coordinator per run folder: a live one keeps others out, a killed one lets go at once."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from server_app.run_lock import holder, run_folder_lock

ROOT = Path(__file__).resolve().parent.parent


def _hold(run_dir: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from pathlib import Path; from server_app.run_lock import run_folder_lock\n"
        f"with run_folder_lock(Path({str(run_dir)!r})):\n    print('held', flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_coordinator_keeps_others_out_and_a_killed_one_lets_go(tmp_path):
    proc = _hold(tmp_path)
    try:
        assert holder(tmp_path) == f"pid {proc.pid} on " + socket.gethostname()
        with (
            pytest.raises(ConfigError, match=rf"in use by a running coordinator \(pid {proc.pid} "),
            run_folder_lock(tmp_path),
        ):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert holder(tmp_path) is None
    with run_folder_lock(tmp_path):  # taken over at once
        assert holder(tmp_path) == f"pid {os.getpid()} on " + socket.gethostname()
    assert holder(tmp_path) is None


def test_python_m_sim_refuses_a_folder_in_use_and_moves_nothing(tmp_path, capsys):
    from engine.simulate import simulate

    run_dir = tmp_path / "out" / "busy"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    proc = _hold(run_dir)
    try:
        assert simulate(["run_name=busy", f"output_dir={tmp_path / 'out'}"]) == 2
        assert "in use by a running coordinator" in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["busy"]  # not moved aside
    finally:
        proc.kill()
        proc.wait(timeout=30)
