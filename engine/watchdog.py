"""`python -m engine.watchdog PARENT TAG`: when process PARENT dies, however it dies (SIGKILL
included), stop every process carrying the launcher's TAG (engine/processes.py).

The launcher's own children get a parent-death signal, but what they start (Flower's SuperExec,
the simulation, Ray's workers and helpers) does not, and an orphaned simulation goes on training
and writing into the run folder. This process outlives the launcher by design: it polls its parent
and, once reparented, SIGTERMs the tagged processes, waits, and SIGKILLs what is left. Started by
`engine.processes.ProcessGroup` with its first process.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from engine.processes import _signal_pids, scan_processes

POLL_S = 0.5


def stop_tagged(tag: str, grace_s: float = 3.0) -> None:
    sessions: set[int] = set()
    _signal_pids(scan_processes(tag, sessions), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (alive := scan_processes(tag, sessions)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(5):
        if not alive:
            return
        _signal_pids(alive, signal.SIGKILL)
        time.sleep(0.2)
        alive = scan_processes(tag, sessions)


def main(argv: list[str]) -> int:
    parent, tag = int(argv[0]), argv[1]
    while os.getppid() == parent:
        time.sleep(POLL_S)
    stop_tagged(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
