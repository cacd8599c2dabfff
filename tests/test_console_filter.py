"""What of `flwr run --stream` output reaches the terminal (engine.console.ConsoleFilter and
engine.launcher._FlwrRun._pump)."""

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.console import ConsoleFilter
from engine.launcher import _FlwrRun

STREAM = (
    "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n"
    "Successfully started run 4242\n"
    "(ClientAppActor pid=123) node 2 steps 375-400:  48%|###   | 12/25\r"
    "(ClientAppActor pid=123) node 2 steps 375-400: 100%|######| 25/25\n"
    "(ClientAppActor pid=77) [repeated 26x across cluster]\n"
    "[spes] round 1/2 | held-out loss 5.0000\n"
    "[spes] rounds:  50%|#####     | 1/2\r" + " " * 30 + "\r"
    "[spes] round 2/2 | held-out loss 4.0000\n"
    "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception: boom\n"
    "Traceback (most recent call last):\n"
    '  File "app.py", line 1, in main\n'
    "ValueError: boom\n"
    "INFO :      Run finished\n"
    "(ClientAppActor pid=5) Traceback (most recent call last):\n"
    '(ClientAppActor pid=5)   File "node.py", line 9, in train\n'
    "(ClientAppActor pid=5) KeyError: 'k'\n"
    "(ClientAppActor pid=5) node 0 steps 0-25: 4%|\r"
    "[spes] done"  # no newline at the end of the stream
)


def _filtered(mode, chunk=7):
    f = ConsoleFilter(mode, Path("/runs/x/flwr-run.log"))
    out = []
    for i in range(0, len(STREAM), chunk):  # arbitrary chunk borders must not matter
        out += [f.shown(s) for s in f.segments(STREAM[i : i + chunk])]
    out += [f.shown(s) for s in f.rest()]
    return "".join(out)


def test_coordinator_mode_keeps_own_lines_bar_and_errors():
    assert _filtered("coordinator") == (
        "[spes] round 1/2 | held-out loss 5.0000\n"
        "[spes] rounds:  50%|#####     | 1/2\r" + " " * 30 + "\r"
        "[spes] round 2/2 | held-out loss 4.0000\n"
        "[sim] error output follows; full log: /runs/x/flwr-run.log\n"
        "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception: boom\n"
        "Traceback (most recent call last):\n"
        '  File "app.py", line 1, in main\n'
        "ValueError: boom\n"
        "(ClientAppActor pid=5) Traceback (most recent call last):\n"
        '(ClientAppActor pid=5)   File "node.py", line 9, in train\n'
        "(ClientAppActor pid=5) KeyError: 'k'\n"
        "[spes] done"
    )


def test_node_lines_only_when_asked_and_all_mode_is_verbatim():
    with_nodes = _filtered("coordinator+nodes")
    assert "node 2 steps 375-400: 100%" in with_nodes and "[repeated 26x" in with_nodes
    assert "Starting Flower Simulation" not in with_nodes
    assert _filtered("all") == STREAM
    with pytest.raises(ValueError, match="console mode"):
        ConsoleFilter("quiet", Path("x"))


def test_pump_tees_everything_and_finds_the_run_id(tmp_path, capsys):
    run = _FlwrRun(SimpleNamespace(run_dir=tmp_path), ["flwr"], None, "coordinator")
    data = STREAM.encode()
    run._pump(io.BufferedReader(io.BytesIO(data), buffer_size=16))
    assert run.run_id == 4242
    assert (tmp_path / "flwr-run.log").read_bytes() == data
    out = capsys.readouterr().out
    assert out.count("held-out loss") == 2 and "steps 375-400" not in out and out.endswith("[spes] done")
