"""Processes started by the launcher: each in its own session, tagged through the environment, found
again by the tag (or the session) and stopped by PID, Ray's detached helpers included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from engine.flwr_config import flwr_env

log = logging.getLogger("engine.launcher")
TAG_ENV = "SPES_LAUNCHER_TAG"  # inherited by every process we (indirectly) start


# ---------------------------------------------------------------- process tracking
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) from /proc/<pid>/stat, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[3])  # state, (ppid, pgrp,) session
    except (OSError, IndexError, ValueError):
        return None


def _proc_environ_has(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return needle in fh.read().split(b"\0")
    except OSError:  # gone or not ours
        return False


def scan_processes(marker: str, sessions: set[int] | None = None) -> list[int]:
    """Live (non-zombie) PIDs, other than this process, that carry ``marker`` in their
    environment (``NAME=value``; a bare value means ``SPES_LAUNCHER_TAG=<value>``) or
    belong to one of ``sessions``.

    If ``sessions`` is given, the session ids of marked processes are added to it
    (never this process's own session). Sessions matter because some processes
    overwrite their environment block (Ray's DashboardAgent/RuntimeEnvAgent use
    setproctitle), so /proc/<pid>/environ no longer shows the marker; they stay in the
    session of the detached ``flower-superexec`` that spawned their driver.
    """
    entry = marker if "=" in marker else f"{TAG_ENV}={marker}"
    me = os.getpid()
    if not os.path.isdir("/proc"):  # pragma: no cover - non-Linux: environment only
        return _scan_psutil(entry, me)
    needle = entry.encode()
    own_sid = os.getsid(0)
    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        if _proc_environ_has(pid, needle):
            found[pid] = stat[1]
            if sessions is not None and stat[1] not in (own_sid, 0, 1):
                sessions.add(stat[1])
        elif sessions and stat[1] in sessions:
            found[pid] = stat[1]
    return sorted(found)


def tagged_processes(tag: str) -> list[int]:
    """Live PIDs whose environment carries ``SPES_LAUNCHER_TAG=<tag>`` (or ``tag``
    itself if it is a ``NAME=value`` pair)."""
    return scan_processes(tag)


def _scan_psutil(entry: str, me: int) -> list[int]:  # pragma: no cover
    try:
        import psutil
    except ImportError:
        return []
    name, _, value = entry.partition("=")
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != me and proc.environ().get(name) == value:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _die_with_parent_preexec() -> Any:
    """Linux: a ``preexec_fn`` making the child get SIGTERM if the launching thread
    dies (e.g. the Python process is SIGKILLed). libc is loaded here, in the parent,
    so the child only makes one syscall between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None

    def preexec() -> None:  # pragma: no cover - runs in the child
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return preexec


def _start_watchdog(tag: str) -> subprocess.Popen[bytes]:
    """`python -m engine.watchdog` for this process and `tag`: in a session of its own, without the tag."""
    env = {k: v for k, v in os.environ.items() if k != TAG_ENV}
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "engine.watchdog", str(os.getpid()), tag],
        env=env,
        cwd=str(Path(__file__).resolve().parent.parent),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


class ProcessGroup:
    """Processes started by us, each in its own session, all tagged via env."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.sessions: set[int] = set()  # sessions seen holding tagged processes
        self._log_handles: list[IO[bytes]] = []
        self._watchdog: subprocess.Popen[bytes] | None = None  # stops them all if this process is killed

    def env(self, flwr_home: Path) -> dict[str, str]:
        env = flwr_env(flwr_home)
        env[TAG_ENV] = self.tag
        # Keep the processes self-contained: no attaching to an outside Ray cluster,
        # no legacy gRPC APIs on fixed ports (0.0.0.0:9091/9093).
        for name in ("RAY_ADDRESS", "FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
            env.pop(name, None)
        for name in ("NO_PROXY", "no_proxy"):  # loopback never through a proxy
            env[name] = ",".join(filter(None, [env.get(name), "127.0.0.1", "localhost"]))
        return env

    def start(
        self, name: str, cmd: list[str], env: dict[str, str], cwd: Path, log_file: Path
    ) -> subprocess.Popen[bytes]:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_file, "ab")  # noqa: SIM115 - closed in stop()
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        self._log_handles.append(fh)
        if self._watchdog is None:
            self._watchdog = _start_watchdog(self.tag)
        kwargs: dict[str, Any] = {"start_new_session": True}
        if (preexec := _die_with_parent_preexec()) is not None:
            kwargs["preexec_fn"] = preexec
        proc = subprocess.Popen(  # noqa: S603
            cmd,
            env=env,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            **kwargs,
        )
        self.procs.append((name, proc))
        log.debug("started %s pid=%d: %s", name, proc.pid, " ".join(cmd))
        return proc

    def alive(self) -> list[int]:
        """Live PIDs that are ours (tagged, or in a session a tagged one was in)."""
        for _, proc in self.procs:
            proc.poll()  # reap our direct children
        return scan_processes(self.tag, self.sessions)

    def _wait(self, timeout: float, own_only: bool = False) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            if own_only:
                if all(proc.poll() is not None for _, proc in self.procs):
                    return []
            elif not (alive := self.alive()):
                return []
            if time.monotonic() >= deadline:
                return [p.pid for _, p in self.procs if p.poll() is None] if own_only else alive
            time.sleep(0.1)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process groups we started, newest first (SuperNodes before the
        SuperLink), and wait up to ``grace`` s for them; then SIGTERM whatever of ours
        is left (detached SuperExec, ServerApp/simulation, Ray), wait 3 s; SIGKILL the
        rest (Ray's agents ignore SIGTERM once their raylet is gone)."""
        self.alive()  # learn the sessions (SuperExec's) while everything still runs
        try:
            for _, proc in reversed(self.procs):
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGTERM)
            self._wait(grace, own_only=True)
            if alive := self.alive():
                log.info("SIGTERM to %d leftover processes", len(alive))
                _signal_pids(alive, signal.SIGTERM)
                if alive := self._wait(3.0):
                    log.info("SIGKILL to %d leftover processes", len(alive))
        except BaseException:  # Ctrl-C / SIGTERM during teardown: go straight to SIGKILL
            self.kill()
            raise
        self.kill()

    def kill(self) -> None:
        for _ in range(5):
            for _, proc in self.procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
            alive = self.alive()
            if not alive:
                break
            _signal_pids(alive, signal.SIGKILL)
            time.sleep(0.2)
        else:
            log.error("processes survived SIGKILL: %s", self.alive())
        for _, proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("pid %d did not exit after SIGKILL", proc.pid)
        for fh in self._log_handles:
            fh.close()
        self._log_handles.clear()
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait(timeout=5)
            self._watchdog = None


class SigtermAsExit:
    """While active (main thread only), SIGTERM raises SystemExit(143) so that the
    context managers' ``__exit__`` still tears everything down."""

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def _handler(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        self._previous = signal.signal(signal.SIGTERM, _handler)
        self._installed = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
