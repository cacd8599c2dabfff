"""`python -m federation.superlink <flower-superlink options>`: Flower's SuperLink with a longer SQLite
lock wait, so that many nodes pushing large replies at once do not kill it.

Flower 1.42 keeps the SuperLink's state, messages and their objects included, in SQLite (WAL) and
waits at most 5 s for a lock (`busy_timeout`). A SPES reply carries hundreds of tensors, each an
object row; with several nodes pushing at once, writers queue past those 5 s, requests fail with
`sqlite3.OperationalError: database is locked`, a failed `/v1/runtime/acquire-task` ends the
SuperExec, and every later run stays `pending`. scripts/superlink_lock.py reproduces it (numbers
in docs/operating.md). This command sets `busy_timeout` to `--busy-timeout-s` (default 120 s)
and runs `flower-superlink` with the other options unchanged.

Should the SuperExec end anyway (any cause), Flower's SuperLink neither notices nor starts
another: runs would stay `pending` with no error. Here a watchdog thread logs the exit as an
error and starts a new SuperExec, waiting a little longer after each restart in a row.

Flower's HTTP server waits, on SIGTERM, for every open connection to close, a `flwr run
--stream` or `flwr log --stream` included: measured 57 s before it exited. Here it waits at most
`--shutdown-grace-s` (default 10 s) and then closes them.
"""

from __future__ import annotations

import sys
import threading
import time
from logging import ERROR, INFO

from common.argv import pop_option

DEFAULT_BUSY_TIMEOUT_S = 120.0
DEFAULT_SHUTDOWN_GRACE_S = 10.0
WATCH_POLL_S = 1.0
MAX_BACKOFF_S = 60.0


def _seconds(args: list[str], name: str, default: float) -> tuple[float, list[str]]:
    """`name X` (seconds, > 0) out of args; the rest are flower-superlink's."""
    value, rest = pop_option(args, name)
    seconds = default if value is None else float(value)
    if not seconds > 0:
        raise SystemExit(f"{name} must be > 0, got {seconds}")
    return seconds, rest


def _busy_timeout(args: list[str]) -> tuple[float, list[str]]:
    return _seconds(args, "--busy-timeout-s", DEFAULT_BUSY_TIMEOUT_S)


def bound_shutdown(seconds: float) -> None:
    """The SuperLink's HTTP server closes connections still open `seconds` after a stop signal."""
    import uvicorn

    run = uvicorn.run

    def run_with_bounded_shutdown(*args, **kwargs):
        kwargs.setdefault("timeout_graceful_shutdown", seconds)
        return run(*args, **kwargs)

    uvicorn.run = run_with_bounded_shutdown


def set_busy_timeout(seconds: float) -> None:
    """Every SQLite connection the SuperLink opens from now on waits `seconds` for a lock."""
    import flwr.supercore.sql_mixin as sql

    pragmas = [(name, value) for name, value in sql.SQLITE_PRAGMAS if name != "busy_timeout"]
    sql.SQLITE_PRAGMAS = (("busy_timeout", str(int(seconds * 1000))), *pragmas)


def restart_dead_superexec() -> None:
    """From now on, a SuperLink whose SuperExec exits while it serves logs it and starts a new one."""
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan

    start, shutdown = SuperLinkLifespan._start_superexec_if_needed, SuperLinkLifespan.shutdown

    def start_and_watch(self) -> None:
        start(self)
        if self.superexec_process is not None and not hasattr(self, "_spes_watchdog"):
            self._spes_watchdog = threading.Thread(target=_watch, args=(self, start), daemon=True)
            self._spes_watchdog.start()

    def shutdown_unwatched(self) -> None:
        self._spes_stopping = True  # the SuperExec it terminates is not to be restarted
        shutdown(self)

    SuperLinkLifespan._start_superexec_if_needed = start_and_watch
    SuperLinkLifespan.shutdown = shutdown_unwatched


def _watch(lifespan, start) -> None:
    from flwr.common.logger import log

    in_a_row, last_restart = 0, 0.0
    while not getattr(lifespan, "_spes_stopping", False):
        time.sleep(WATCH_POLL_S)
        proc = lifespan.superexec_process
        code = None if proc is None else proc.poll()
        if code is None or getattr(lifespan, "_spes_stopping", False):
            continue
        in_a_row = in_a_row + 1 if time.monotonic() - last_restart < 2 * MAX_BACKOFF_S else 1
        wait = min(MAX_BACKOFF_S, 2.0 ** (in_a_row - 1))
        log(
            ERROR,
            "SuperExec (pid %d) exited with code %s: runs would stay pending; a new one in %.0fs",
            proc.pid,
            code,
            wait,
        )
        time.sleep(wait)
        if getattr(lifespan, "_spes_stopping", False):
            return
        start(lifespan)
        last_restart = time.monotonic()
        log(INFO, "SuperExec restarted (pid %d)", lifespan.superexec_process.pid)


def main(argv: list[str] | None = None) -> int | None:
    seconds, rest = _busy_timeout(list(sys.argv[1:] if argv is None else argv))
    grace, rest = _seconds(rest, "--shutdown-grace-s", DEFAULT_SHUTDOWN_GRACE_S)
    set_busy_timeout(seconds)
    bound_shutdown(grace)
    restart_dead_superexec()
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *rest]
    return flower_superlink()


if __name__ == "__main__":
    sys.exit(main())
