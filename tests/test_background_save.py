"""A node's state written after its reply (client_app/background_save.py).

Nobody reads it before it is on disk, in this process or in another; a save cut short or failed
is noticed and leaves no state; a process that Flower ends after its reply lives until its save
is done. Slow disks are played by states whose save first waits for a signal.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from client_app import background_save
from client_app.background_save import MARKER_GLOB, save_after_reply, wait_for_saves
from client_app.node_state import NodeState, saved_steps

ROOT = Path(__file__).resolve().parent.parent
KEY = "layers.0.experts.1.w::exp_avg"


def state(step=4) -> NodeState:
    g = torch.Generator().manual_seed(step)
    return NodeState(
        global_step=step,
        owned=[1, 3],
        stream={"epoch": 0, "index": 7},
        owned_tensors={"layers.0.experts.1.w": torch.randn(64, 32, generator=g)},
        optimizer={"layers.0.experts.1.w::exp_avg": torch.randn(64, 32, generator=g)},
    )


@dataclass
class HeldState(NodeState):
    """Its save starts only once `release` is set."""

    release: threading.Event = field(default_factory=threading.Event)

    def save(self, root, keep=2):
        assert self.release.wait(30)
        return super().save(root, keep)


@dataclass
class FullDiskState(NodeState):
    def save(self, root, keep=2):
        raise OSError(28, "No space left on device")


@pytest.fixture(autouse=True)
def no_writer_left():
    yield
    background_save.drain()


def markers(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(MARKER_GLOB))


def test_written_state_is_the_synchronous_save_byte_for_byte(tmp_path):
    save_after_reply(state(), tmp_path / "bg")
    state().save(tmp_path / "sync")
    wait_for_saves(tmp_path / "bg")
    assert markers(tmp_path / "bg") == [] and saved_steps(tmp_path / "bg") == [4]
    for name in ("owned.safetensors", "optimizer.safetensors", "meta.json"):
        assert (tmp_path / "bg" / "step-000000000004" / name).read_bytes() == (
            tmp_path / "sync" / "step-000000000004" / name
        ).read_bytes(), name


def test_a_reader_in_this_process_waits_for_the_save(tmp_path):
    held = HeldState(**vars(state()))
    save_after_reply(held, tmp_path)
    assert markers(tmp_path) == ["saving-000000000004.json"] and saved_steps(tmp_path) == []
    waiter = threading.Thread(target=wait_for_saves, args=(tmp_path,))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # still waiting: the state is not on disk yet
    held.release.set()
    waiter.join(30)
    assert not waiter.is_alive()
    assert markers(tmp_path) == [] and NodeState.load(tmp_path, 4) is not None


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_background_save import HeldState, state
    from client_app.background_save import save_after_reply
    root, go = Path(sys.argv[1]), Path(sys.argv[2])
    held = HeldState(**vars(state()))
    save_after_reply(held, root)
    while not go.exists():
        time.sleep(0.05)
    held.release.set()
""")  # the process exits normally: atexit joins the writer


def test_a_reader_in_another_process_waits_for_the_save(tmp_path):
    root, go = tmp_path / "state", tmp_path / "go"
    script = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"))
    child = subprocess.Popen([sys.executable, "-c", script, str(root), str(go)])
    try:
        deadline = time.monotonic() + 60
        while not markers(root) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert markers(root) == ["saving-000000000004.json"], child.poll()
        waited = {}
        waiter = threading.Thread(target=lambda: waited.setdefault("s", wait_for_saves(root)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and saved_steps(root) == []
        go.touch()
        waiter.join(60)
        assert not waiter.is_alive() and waited["s"] >= 0.5
        assert NodeState.load(root, 4) is not None and markers(root) == []
        assert child.wait(60) == 0
    finally:
        child.kill()


def write_marker(root: Path, pid: int, start) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "saving-000000000004.json"
    path.write_text(json.dumps({"pid": pid, "start": start, "step": 4}))
    return path


def test_a_save_cut_short_is_noticed_at_once(tmp_path, caplog):
    """The marker of a process that is gone (exited, a zombie, or its PID reused) is removed
    without waiting, and says so; no state appears."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    zombie = subprocess.Popen(["true"])  # never waited for: stays a zombie while we look
    deadline = time.monotonic() + 10
    while background_save._stat(zombie.pid)[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    cases = {
        "exited": (gone.pid, None),
        "zombie": (zombie.pid, background_save.process_start_time(zombie.pid)),
        "pid reused": (os.getppid(), "1"),
    }  # a live process, but not the one that wrote the marker
    for name, (pid, start) in cases.items():
        root = tmp_path / name.replace(" ", "-")
        write_marker(root, pid, start)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spes.node"):
            assert wait_for_saves(root) < 1.0, name
        assert markers(root) == [] and saved_steps(root) == [], name
        assert "cut short" in caplog.text, name
    zombie.wait()


def test_a_live_writer_that_never_finishes_times_out(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        write_marker(tmp_path, sleeper.pid, background_save.process_start_time(sleeper.pid))
        with pytest.raises(TimeoutError, match=f"process {sleeper.pid} is still saving"):
            wait_for_saves(tmp_path, timeout_s=0.3)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_failed_save_is_reported_and_leaves_no_state(tmp_path, caplog):
    save_after_reply(FullDiskState(**vars(state())), tmp_path)
    with caplog.at_level(logging.WARNING, logger="spes.node"):
        wait_for_saves(tmp_path)
    assert "No space left on device" in caplog.text and "absent" in caplog.text
    assert markers(tmp_path) == [] and saved_steps(tmp_path) == []


FLOWER_EXIT = textwrap.dedent("""
    import sys
    from dataclasses import dataclass
    from pathlib import Path
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import time
    from flwr.supercore.constant import FORCE_EXIT_TIMEOUT_SECONDS
    from flwr.supercore.exit import ExitCode, flwr_exit
    from test_background_save import state
    from client_app.background_save import save_after_reply
    from client_app.node_state import NodeState

    @dataclass
    class SlowDisk(NodeState):
        def save(self, root, keep=2):
            time.sleep(FORCE_EXIT_TIMEOUT_SECONDS + 2)  # longer than Flower lets an exiting process live
            return super().save(root, keep)

    save_after_reply(SlowDisk(**vars(state())), Path(sys.argv[1]))
    flwr_exit(code=ExitCode.SUCCESS)  # what flwr-clientapp does after pushing the reply
""")


def test_a_flower_process_ending_after_its_reply_lives_until_the_save_is_done(tmp_path):
    script = FLOWER_EXIT.format(root=str(ROOT), tests=str(ROOT / "tests"))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from flwr.supercore.constant import FORCE_EXIT_TIMEOUT_SECONDS

    assert time.monotonic() - t0 > FORCE_EXIT_TIMEOUT_SECONDS + 2
    assert NodeState.load(tmp_path, 4) is not None and markers(tmp_path) == []


def test_a_same_step_save_cut_between_its_renames_loses_nothing(tmp_path):
    first = state(4)
    first.save(tmp_path)
    # the crash window of saving step 4 again: the old state is moved aside, the new one not yet in place
    os.replace(tmp_path / "step-000000000004", tmp_path / ".replaced-step-000000000004")
    assert saved_steps(tmp_path) == [4]  # put back
    back = NodeState.load(tmp_path, 4)
    assert back is not None and torch.equal(back.optimizer[KEY], first.optimizer[KEY])
    # a second save of step 4 replaces it and leaves nothing aside
    second = state(4)
    second.optimizer = {KEY: first.optimizer[KEY] + 1}
    second.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000004"]
    assert torch.equal(NodeState.load(tmp_path, 4).optimizer[KEY], first.optimizer[KEY] + 1)
