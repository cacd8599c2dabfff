"""One coordinator per run folder (cheap to import: the launcher checks it before moving a folder aside)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from common.errors import ConfigError

LOCK_NAME = ".coordinator.lock"


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """One coordinator per run folder: an exclusive lock on `<run dir>/.coordinator.lock` for the run's life.

    The operating system drops the lock when its process ends, however it ends, so a lock left by a
    killed coordinator is taken over at once; a live one makes a second coordinator (another run,
    or a `resume=true` started too early) refuse, naming the holder."""
    path = run_dir / LOCK_NAME
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            who = fh.read().strip() or "another process"
            raise ConfigError(
                f"{run_dir} is in use by a running coordinator ({who}); wait for it to end or stop it first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        yield


def holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock now (None when nobody does: a coordinator that died let go)."""
    path = run_dir / LOCK_NAME
    if not path.exists():
        return None
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            return fh.read().strip() or "another process"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def move_aside(run_dir: Path) -> Path | None:
    """Move an earlier run's folder to <run_dir>.<timestamp> so nothing it wrote is lost; None if
    there is nothing to move. Refuses a folder a live coordinator holds."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    if (busy := holder(run_dir)) is not None:
        raise ConfigError(f"{run_dir} is in use by a running coordinator ({busy}); wait for it to end or stop it first")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = run_dir.with_name(f"{run_dir.name}.{stamp}"), 1
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}.{stamp}-{n}"), n + 1
    run_dir.rename(target)
    return target
