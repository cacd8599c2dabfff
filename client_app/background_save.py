"""Writing a node's state after its reply has left, not before.

At 1b a node's state is gigabytes (owned experts, AdamW moments); writing and fsyncing it took
~8 s per round on the test machine, all of it between the last training step and the reply.
With `train.save_in_background` the round hands the state to a thread and returns; the write
overlaps the upload, the coordinator's aggregation and the next downlink.

Nothing may read or change that state before it is on disk, in this process or another:

* a marker `saving-<step>.json` (this process's PID and start time) is written, fsynced, before
  the thread starts and removed when the state directory has been renamed into place (or the
  write failed);
* `wait_for_saves(root)` joins this process's writer and waits, bounded, for markers of other
  live processes (a simulation actor that ran the node before, the previous `flwr-clientapp`
  process in deployment); a marker whose process is gone was a save cut short: it is removed and
  the state is simply absent (the node then asks for the full model, as after any lost state).
  Every round, the setup query, the evaluation and `drain()` call it before going on;
* in deployment Flower ends each `flwr-clientapp` process after the reply, force-exiting it
  five seconds into its exit; an exit handler that runs before that timer starts joins the
  writers, so the process lives until its state is safe.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from pathlib import Path

from client_app.node_state import NodeState
from common.atomic import write_text_atomic

log = logging.getLogger("spes.node")

MARKER_GLOB = "saving-*.json"
WAIT_TIMEOUT_S = 1800.0  # a 7b node's state on a slow disk; a stuck save fails the round loudly
_POLL_S = 0.1

_lock = threading.Lock()
_writers: dict[str, threading.Thread] = {}
_failures: dict[str, str] = {}
_exit_hooked = False


def _stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of a process (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), fields[19].decode()
    except (OSError, IndexError):
        return None


def process_start_time(pid: int) -> str | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether a process still runs: not exited, not a zombie, and (given its start time) its PID not reused."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(pid)
    if stat is None:
        return True  # no /proc: trust kill(0)
    return stat[0] not in ("Z", "X") and (start is None or stat[1] == start)


def _hook_exit() -> None:
    """Join the writers before the process ends: Flower's pre-force-exit handler, else atexit."""
    global _exit_hooked
    if _exit_hooked:
        return
    _exit_hooked = True
    atexit.register(drain)
    try:
        from flwr.supercore.exit import add_exit_handler
    except ImportError:  # no Flower here (scripts/gpu_check.py): atexit is enough
        return
    add_exit_handler(drain, run_before_force_exit=True)


def save_after_reply(state: NodeState, root: Path) -> None:
    """Write `state` under `root` in a background thread; `wait_for_saves(root)` waits for it.

    The tensors in `state` must not change until then (a kept model trains again only after the
    next round's wait)."""
    root = Path(root)
    wait_for_saves(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f"saving-{state.global_step:012d}.json"
    write_text_atomic(
        marker, json.dumps({"pid": os.getpid(), "start": process_start_time(os.getpid()), "step": state.global_step})
    )

    def write() -> None:
        try:
            state.save(root)
        except BaseException as exc:  # noqa: BLE001 - reported by the next wait, never lost silently
            log.error("saving the node state at step %d in %s failed: %s", state.global_step, root, exc)
            with _lock:
                _failures[str(root)] = f"step {state.global_step}: {type(exc).__name__}: {exc}"
        finally:
            marker.unlink(missing_ok=True)

    thread = threading.Thread(target=write, name=f"spes-save-{state.global_step}", daemon=False)
    with _lock:
        _writers[str(root)] = thread
    _hook_exit()
    thread.start()


def wait_for_saves(root: Path, timeout_s: float = WAIT_TIMEOUT_S) -> float:
    """Block until no save into `root` is under way here or in another live process.

    Returns the seconds waited. Raises TimeoutError if another process's save outlasts
    `timeout_s`. A save of this process that failed is logged again here, once."""
    root = Path(root)
    t0 = time.perf_counter()
    with _lock:
        thread = _writers.pop(str(root), None)
    if thread is not None:
        thread.join()
    with _lock:
        failure = _failures.pop(str(root), None)
    if failure is not None:
        log.warning("the last background save into %s failed (%s); that state is absent", root, failure)
    if not root.is_dir():
        return time.perf_counter() - t0
    deadline = time.monotonic() + timeout_s
    for marker in sorted(root.glob(MARKER_GLOB)):
        try:
            info = json.loads(marker.read_text())
            pid, start = int(info["pid"]), info.get("start")
        except FileNotFoundError:
            continue  # finished meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            pid, start = -1, None
        # This process's own writers were joined above: its markers are never waited for.
        while marker.exists() and 0 < pid != os.getpid() and process_alive(pid, start):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"process {pid} is still saving a node state into {root} after {timeout_s:.0f}s ({marker.name})"
                )
            time.sleep(_POLL_S)
        if marker.exists():
            log.warning("a save into %s was cut short (%s, process gone); that state is absent", root, marker.name)
            marker.unlink(missing_ok=True)
    return time.perf_counter() - t0


def drain() -> None:
    """Join every background save of this process (at exit, and in tests)."""
    with _lock:
        roots = list(_writers)
    for root in roots:
        wait_for_saves(Path(root))
