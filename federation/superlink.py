"""`python -m federation.superlink <flower-superlink options>`: Flower's SuperLink with a longer SQLite
lock wait, so that many nodes pushing large replies at once do not kill it.

Flower 1.42 keeps the SuperLink's state, messages and their objects included, in SQLite (WAL) and
waits at most 5 s for a lock (`busy_timeout`). A SPES reply carries hundreds of tensors, each an
object row; with several nodes pushing at once, writers queue past those 5 s, requests fail with
`sqlite3.OperationalError: database is locked`, a failed `/v1/runtime/acquire-task` ends the
SuperExec, and every later run stays `pending`. scripts/superlink_lock.py reproduces it (numbers
in docs/operating.md). This command sets `busy_timeout` to `--busy-timeout-s` (default 120 s)
and runs `flower-superlink` with the other options unchanged.
"""

from __future__ import annotations

import sys

from common.argv import pop_option

DEFAULT_BUSY_TIMEOUT_S = 120.0


def _busy_timeout(args: list[str]) -> tuple[float, list[str]]:
    """`--busy-timeout-s X` out of args (the rest are flower-superlink's)."""
    value, rest = pop_option(args, "--busy-timeout-s")
    seconds = DEFAULT_BUSY_TIMEOUT_S if value is None else float(value)
    if not seconds > 0:
        raise SystemExit(f"--busy-timeout-s must be > 0, got {seconds}")
    return seconds, rest


def set_busy_timeout(seconds: float) -> None:
    """Every SQLite connection the SuperLink opens from now on waits `seconds` for a lock."""
    import flwr.supercore.sql_mixin as sql

    pragmas = [(name, value) for name, value in sql.SQLITE_PRAGMAS if name != "busy_timeout"]
    sql.SQLITE_PRAGMAS = (("busy_timeout", str(int(seconds * 1000))), *pragmas)


def main(argv: list[str] | None = None) -> int | None:
    seconds, rest = _busy_timeout(list(sys.argv[1:] if argv is None else argv))
    set_busy_timeout(seconds)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *rest]
    return flower_superlink()


if __name__ == "__main__":
    sys.exit(main())
