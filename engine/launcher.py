"""Start and stop local Flower 1.42 processes for simulation and loopback deployment.

Everything runs from a *run directory*: ``FLWR_HOME`` is ``<run_dir>/.flwr`` (never
``~/.flwr``), logs and the SuperLink database live there, and every process is
started and stopped by us.

Facts about Flower 1.42 this module relies on (checked against the installed sources):

* ``flower-superlink`` serves the Control, Fleet and Runtime APIs over HTTP on a
  single ``--host``/``--port``; ``--control-api-address``/``--fleet-api-address``
  are deprecated no-ops for the HTTP APIs. ``flwr`` connections in
  ``$FLWR_HOME/config.toml`` must point at that HTTP address. ``GET /health``
  answers 200 once it serves.
* The SuperLink starts ``flower-superexec`` in a *new session* (detached), which
  starts ``flwr-simulation``/``flwr-serverapp``, which starts Ray (gcs_server,
  raylet, workers, ...). None of these are in the SuperLink's process group, so we
  tag every process we start with an environment variable (inherited by all
  descendants, Ray included) and, on teardown, kill whatever still carries the tag.
* Sub-processes are started by bare name (``flower-superexec``, ``flwr-simulation``),
  so ``PATH`` must contain the environment's ``bin`` directory.
* ``flwr run --stream`` exits 0 even when the run fails; the outcome has to be read
  from ``flwr ls --run-id <id> --format json`` (``status`` ``finished:completed`` /
  ``finished:failed`` / ``finished:stopped``).
* ``--run-config`` accepts only keys of ``[tool.flwr.app.config]`` (otherwise the
  SuperLink answers a bare "Invalid run configuration"), does no type checking, and
  its inline parser is the regex ``key=('...'|"..."|\\S+)``: values are TOML, strings
  must be quoted and cannot contain the quote character that delimits them.

No torch import here: this module must stay cheap to import.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

SIM_CONNECTION = "spes-sim"
LOCAL_CONNECTION = "spes-local"
TAG_ENV = "SPES_LAUNCHER_TAG"  # inherited by every process we (indirectly) start
HOST = "127.0.0.1"

RunConfigValue = str | int | float | bool

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_NOT_STARTED = 2
EXIT_TIMEOUT = 124

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_RUN_ID = re.compile(r"Successfully started run (\d+)")


# --------------------------------------------------------------------------- basics
def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def _exe(name: str) -> str:
    """Path of a Flower console script, preferring this interpreter's environment."""
    candidate = _bin_dir() / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` not found next to {sys.executable} nor on PATH")
    return found


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: a copy of ``os.environ`` with ``FLWR_HOME``
    set and telemetry, the update check and runtime dependency installation off.

    The interpreter's ``bin`` directory is put first on ``PATH`` because the SuperLink
    and SuperNode start ``flower-superexec``/``flwr-*`` by bare name.
    """
    env = os.environ.copy()
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    path = env.get("PATH", "")
    bin_dir = str(_bin_dir())
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = bin_dir + (os.pathsep + path if path else "")
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except OSError:
        return "<no log>"


# ----------------------------------------------------------------- run config format
def _toml_value(value: RunConfigValue) -> str | None:
    """Inline TOML for ``flwr run --run-config``; None if the value cannot be inlined."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # Flower splits pairs with key=('[^']*'|"[^"]*"|\S+): the delimiting quote
        # may not appear inside, even escaped.
        if '"' not in value:
            return json.dumps(value, ensure_ascii=False)  # valid TOML basic string
        if "'" not in value and not any(ord(c) < 32 or c == "\x7f" for c in value):
            return f"'{value}'"  # TOML literal string, no escapes
        return None
    raise TypeError(f"run-config values must be str, int, float or bool, got {value!r}")


def format_run_config(run_config: Mapping[str, RunConfigValue]) -> str | None:
    """``k=v`` pairs for ``--run-config`` (strings quoted), or None if some string
    cannot be expressed inline (contains both ``'`` and ``"``)."""
    parts = []
    for key, value in run_config.items():
        if not _BARE_KEY.match(key):
            raise ValueError(f"invalid run-config key {key!r}")
        text = _toml_value(value)
        if text is None:
            return None
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _run_config_args(run_config: Mapping[str, RunConfigValue], run_dir: Path) -> list[str]:
    if not run_config:
        return []
    inline = format_run_config(run_config)
    if inline is not None:
        return ["--run-config", inline]
    import tomli_w  # a flwr dependency

    path = run_dir / "run-config.toml"  # flwr loads a single *.toml argument as a file
    path.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
    return ["--run-config", str(path)]


def app_config_keys(app_dir: Path) -> set[str]:
    """Flattened keys of ``[tool.flwr.app.config]`` in the app's pyproject.toml."""
    with open(Path(app_dir) / "pyproject.toml", "rb") as fh:
        data = tomllib.load(fh)
    cfg = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})

    def flat(d: Mapping[str, Any], prefix: str = "") -> set[str]:
        keys: set[str] = set()
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            keys |= flat(v, key) if isinstance(v, dict) else {key}
        return keys

    return flat(cfg)


def check_run_config(app_dir: Path, run_config: Mapping[str, RunConfigValue]) -> None:
    """Raise ValueError for keys Flower would reject (only a bare "Invalid run
    configuration" comes back from the SuperLink otherwise)."""
    unknown = sorted(set(run_config) - app_config_keys(app_dir))
    if unknown:
        raise ValueError(
            f"run-config keys {unknown} are not in [tool.flwr.app.config] of "
            f"{Path(app_dir) / 'pyproject.toml'}; Flower only overrides existing keys"
        )


def write_connection(flwr_home: Path, name: str, address: str,
                     root_certificates: Path | None = None) -> Path:
    """Add/replace ``[superlink.<name>]`` in config.toml: ``insecure = true``, or with
    ``root_certificates`` a TLS connection verified against that CA (Flower 1.42 accepts
    only an absolute path there).

    Never writes a ``local`` (``:local:``) connection: that would make ``flwr`` start
    a detached SuperLink on 127.0.0.1:39091 which nobody stops.
    """
    import tomli_w  # a flwr dependency

    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if path.exists():
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    superlink = data.setdefault("superlink", {})
    superlink[name] = ({"address": address, "insecure": True} if root_certificates is None
                       else {"address": address,
                             "root-certificates": str(Path(root_certificates).resolve())})
    superlink.setdefault("default", name)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS SuperLink: the CA certificate (given to SuperNodes and ``flwr``
    as root certificate) and the SuperLink's certificate and key (the certificate must name
    the address the clients dial, here 127.0.0.1)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert),
                "--ssl-keyfile", str(self.server_key)]


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
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


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


class _ProcessGroup:
    """Processes started by us, each in its own session, all tagged via env."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.sessions: set[int] = set()  # sessions seen holding tagged processes
        self._log_handles: list[IO[bytes]] = []

    def env(self, flwr_home: Path) -> dict[str, str]:
        env = flwr_env(flwr_home)
        env[TAG_ENV] = self.tag
        # Keep the processes self-contained: no attaching to an outside Ray cluster,
        # no legacy gRPC APIs on fixed ports (0.0.0.0:9091/9093).
        for name in ("RAY_ADDRESS", "FLWR_INTERNAL_GRPC_CONTROL_API",
                     "FLWR_INTERNAL_GRPC_FLEET_API"):
            env.pop(name, None)
        for name in ("NO_PROXY", "no_proxy"):  # loopback never through a proxy
            env[name] = ",".join(filter(None, [env.get(name), "127.0.0.1", "localhost"]))
        return env

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path,
              log_file: Path) -> subprocess.Popen[bytes]:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_file, "ab")  # noqa: SIM115 - closed in stop()
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        self._log_handles.append(fh)
        kwargs: dict[str, Any] = {"start_new_session": True}
        if (preexec := _die_with_parent_preexec()) is not None:
            kwargs["preexec_fn"] = preexec
        proc = subprocess.Popen(  # noqa: S603
            cmd, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=fh,
            stderr=subprocess.STDOUT, **kwargs,
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
                return [p.pid for _, p in self.procs if p.poll() is None] if own_only \
                    else alive
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
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)
                    except (ProcessLookupError, PermissionError):
                        pass
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
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
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


class _SigtermAsExit:
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


# ------------------------------------------------------------------ flwr CLI helpers
def _flwr_json(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60.0
               ) -> dict[str, Any] | None:
    """Run ``flwr <args> --format json`` and parse its JSON; None on failure."""
    try:
        res = subprocess.run(  # noqa: S603
            [_exe("flwr"), *args, "--format", "json"], env=env, cwd=str(cwd),
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        log.warning("`flwr %s` timed out", " ".join(args))
        return None
    out = res.stdout
    start = out.find("{")
    if start < 0:
        log.debug("`flwr %s` gave no JSON: %s %s", " ".join(args), out, res.stderr)
        return None
    try:
        data = json.loads(out[start:])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout: float,
                  ca_cert: Path | None = None) -> bool:
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if ca_cert is not None:
        handlers.append(urllib.request.HTTPSHandler(
            context=ssl.create_default_context(cafile=str(ca_cert))))
    opener = urllib.request.build_opener(*handlers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with opener.open(url, timeout=1.0) as resp:  # noqa: S310
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


class _FlowerLocal:
    """Common part: a SuperLink (simulation or not) plus an ``flwr`` connection."""

    connection: str
    simulation: bool
    console = "all"  # what `flwr run` output reaches stdout: CONSOLE_MODES

    def __init__(self, run_dir: Path, log_file: Path | None = None,
                 startup_timeout: float = 60.0, stop_grace: float = 10.0,
                 tls: TlsFiles | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.tls = tls
        self.extra_env = dict(extra_env or {})
        self.flwr_home = self.run_dir / ".flwr"
        self.log_file = Path(log_file) if log_file else self.run_dir / "superlink.log"
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.port: int | None = None
        self._group = _ProcessGroup()
        self._sigterm = _SigtermAsExit()
        self.timings: dict[str, float] = {}

    # public bits ----------------------------------------------------------------
    @property
    def tag(self) -> str:
        """Value of ``SPES_LAUNCHER_TAG`` carried by every process started here."""
        return self._group.tag

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("SuperLink not started")
        return f"{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return self._env(self.flwr_home)

    def _env(self, flwr_home: Path) -> dict[str, str]:
        return {**self._group.env(flwr_home), **self.extra_env}

    def processes(self) -> list[int]:
        """Live PIDs started (directly or not) by this object."""
        return self._group.alive()

    # lifecycle ------------------------------------------------------------------
    def __enter__(self) -> _FlowerLocal:
        t0 = time.monotonic()
        self._sigterm.install()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.flwr_home.mkdir(parents=True, exist_ok=True)
            self._start_superlink()
            write_connection(self.flwr_home, self.connection, self.address,
                             None if self.tls is None else self.tls.ca_cert)
            self._after_superlink()
        except BaseException:
            self._teardown()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        log.info("%s up on %s in %.1fs (logs in %s)", type(self).__name__, self.address,
                 self.timings["start_s"], self.run_dir)
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _teardown(self) -> None:
        t0 = time.monotonic()
        try:
            self._group.stop(self.stop_grace)
        finally:
            self._sigterm.restore()
        self.timings["stop_s"] = time.monotonic() - t0
        log.info("%s stopped in %.1fs", type(self).__name__, self.timings["stop_s"])

    def _superlink_cmd(self, port: int) -> list[str]:
        # Dependencies come from the environment installed from requirements.lock, never
        # from a per-run `uv sync` (see docs/join-as-supernode.md).
        security = ["--insecure"] if self.tls is None else self.tls.superlink_args()
        cmd = [_exe("flower-superlink"), *security, "--isolation", "subprocess",
               "--host", HOST, "--port", str(port),
               "--database", str(self.flwr_home / "state.db"),
               "--disable-runtime-dependency-installation"]
        if self.simulation:
            cmd.append("--simulation")
        return cmd

    def _start_superlink(self) -> None:
        for attempt in range(3):
            port = find_free_port()
            proc = self._group.start("flower-superlink", self._superlink_cmd(port),
                                     self.env, self.run_dir, self.log_file)
            scheme = "http" if self.tls is None else "https"
            if _wait_http_ok(f"{scheme}://{HOST}:{port}/health", proc, self.startup_timeout,
                             None if self.tls is None else self.tls.ca_cert):
                self.port = port
                return
            tail = _tail(self.log_file)
            if proc.poll() is not None and "address already in use" in tail.lower() \
                    and attempt < 2:
                log.warning("port %d taken, retrying", port)
                continue
            raise RuntimeError(
                f"flower-superlink did not become ready on {HOST}:{port} within "
                f"{self.startup_timeout:.0f}s (exit code {proc.poll()}); "
                f"log {self.log_file}:\n{tail}")

    def _after_superlink(self) -> None:
        """Hook for LocalDeployment (start SuperNodes)."""

    # running an app -------------------------------------------------------------
    def _run(self, app_dir: Path, run_config: Mapping[str, RunConfigValue],
             timeout_s: float | None, federation_config: str | None = None) -> int:
        if self.port is None:
            raise RuntimeError("use inside `with`")
        app_dir = Path(app_dir).resolve()
        check_run_config(app_dir, run_config)
        cmd = [_exe("flwr"), "run", str(app_dir), self.connection,
               *_run_config_args(run_config, self.run_dir)]
        if federation_config:
            cmd += ["--federation-config", federation_config]
        cmd.append("--stream")
        return _FlwrRun(self, cmd, timeout_s, self.console).execute()


# ------------------------------------------------------------------ console output
CONSOLE_MODES = ("all", "coordinator", "coordinator+nodes")
OWN_PREFIXES = ("[spes]", "[sim]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Ray prefixes what its workers print: "(ClientAppActor pid=123) ", "(raylet, ip=10.0.0.1) ".
_RAY_PREFIX = re.compile(r"^\((?P<who>[A-Za-z_][\w.]*)(?: pid=\d+)?(?:, ip=[\d.]+)?\) ?")
_ERROR = re.compile(r"^(ERROR|CRITICAL)\b|^Traceback \(most recent call last\)|^[\w.]*(Error|Exception)\b:")
_SEGMENT = re.compile(r"[^\r\n]*[\r\n]")


class ConsoleFilter:
    """Which pieces of ``flwr run --stream`` output reach the terminal (the log file
    ``flwr-run.log`` always gets everything).

    ``all``: everything, as Flower prints it. ``coordinator``: lines (and ``\\r``-redrawn
    progress bars) that start with ``[spes]``/``[sim]``, plus errors: ERROR/CRITICAL log
    lines and whole tracebacks, preceded once by where the full log is.
    ``coordinator+nodes`` also passes what the simulated nodes print (Ray's
    ``(ClientAppActor pid=...)`` lines, e.g. per-step progress bars).
    """

    def __init__(self, mode: str, log_path: Path) -> None:
        if mode not in CONSOLE_MODES:
            raise ValueError(f"console mode {mode!r}; expected one of {CONSOLE_MODES}")
        self.mode = mode
        self.log_path = log_path
        self._partial = ""
        self._in_traceback = False
        self._hinted = False

    def segments(self, text: str) -> list[str]:
        """Completed pieces of ``text`` (each ends in ``\\n`` or ``\\r``); the rest waits."""
        text = self._partial + text
        out = _SEGMENT.findall(text)
        self._partial = text[sum(len(s) for s in out):]
        return out

    def rest(self) -> list[str]:
        """The unterminated tail, at end of stream."""
        tail, self._partial = self._partial, ""
        return [tail] if tail else []

    def shown(self, segment: str) -> str:
        """What to print for one segment ("" to drop it)."""
        if self.mode == "all":
            return segment
        body = _ANSI.sub("", segment).rstrip("\r\n")
        node = _RAY_PREFIX.match(body)
        if node:
            body = body[node.end():]
        if self._in_traceback:
            # A traceback is indented lines ending with the unindented exception line.
            self._in_traceback = body[:1] in (" ", "\t") or not body.strip()
            return segment
        if _ERROR.search(body):
            self._in_traceback = body.startswith("Traceback")
            if not self._hinted:
                self._hinted = True
                return f"[sim] error output follows; full log: {self.log_path}\n{segment}"
            return segment
        if node:
            return segment if self.mode == "coordinator+nodes" else ""
        stripped = body.lstrip()
        if stripped.startswith(OWN_PREFIXES):
            return segment
        # tqdm clears its bar with a run of spaces before printing a line above it.
        if segment.endswith("\r") and not stripped:
            return segment
        return ""


class _FlwrRun:
    """One ``flwr run --stream``: forward its output, find the outcome, stop on abort."""

    def __init__(self, link: _FlowerLocal, cmd: list[str], timeout_s: float | None,
                 console: str = "all") -> None:
        self.link = link
        self.cmd = cmd
        self.timeout_s = timeout_s
        self.run_id: int | None = None
        self.out_log = link.run_dir / "flwr-run.log"
        self.console = ConsoleFilter(console, self.out_log)

    def _pump(self, stream: IO[bytes]) -> None:
        # Chunks, not lines: a progress bar redraws with "\r" and no newline for a whole round.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        read = getattr(stream, "read1", stream.read)
        with open(self.out_log, "ab") as tee:
            while True:
                raw = read(65536)
                tee.write(raw)
                tee.flush()
                text = decoder.decode(raw, final=not raw)
                segments = self.console.segments(text) + (self.console.rest() if not raw else [])
                shown = []
                for segment in segments:
                    if self.run_id is None and (m := _RUN_ID.search(segment)):
                        self.run_id = int(m.group(1))
                    shown.append(self.console.shown(segment))
                try:
                    sys.stdout.write("".join(shown))
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass
                if not raw:
                    return

    def execute(self) -> int:
        link = self.link
        t0 = time.monotonic()
        deadline = None if self.timeout_s is None else t0 + self.timeout_s
        log.info("$ %s", " ".join(self.cmd))
        proc = subprocess.Popen(  # noqa: S603
            self.cmd, env=link.env, cwd=str(link.run_dir), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        assert proc.stdout is not None
        pump = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        pump.start()
        next_scan = time.monotonic() + 5.0
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    log.error("run timed out after %.0fs; stopping it", self.timeout_s)
                    self._abort(proc)
                    return EXIT_TIMEOUT
                try:
                    rc = proc.wait(timeout=1.0 if left is None else min(1.0, left))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= next_scan:  # keep track of new sessions
                        link._group.alive()
                        next_scan = time.monotonic() + 5.0
                    continue
            pump.join(timeout=10)
            if self.run_id is None:
                log.error("`flwr run` exited with %s without starting a run (see %s)",
                          rc, self.out_log)
                return EXIT_NOT_STARTED
            status = self._final_status(deadline)
            link.timings["run_s"] = time.monotonic() - t0
            if status is None:
                log.error("run %s did not finish after its log stream ended", self.run_id)
                self._abort(proc)
                return EXIT_TIMEOUT
            ok = status.get("status") == "finished:completed"
            (log.info if ok else log.error)(
                "run %s: %s (%s) in %.1fs", self.run_id, status.get("status"),
                status.get("status-details"), link.timings["run_s"])
            return EXIT_OK if ok else EXIT_RUN_FAILED
        except BaseException:  # KeyboardInterrupt, SystemExit from SIGTERM, ...
            log.error("interrupted; stopping the run")
            self._abort(proc)
            raise

    def _status(self) -> dict[str, Any] | None:
        data = _flwr_json(["ls", self.link.connection, "--run-id", str(self.run_id)],
                          self.link.env, self.link.run_dir)
        for run in (data or {}).get("runs", []):
            if str(run.get("run-id")) == str(self.run_id):
                return run
        return None

    def _final_status(self, deadline: float | None) -> dict[str, Any] | None:
        # The stream ends when the run has finished; allow a short lag for the status,
        # longer only if the caller's timeout allows.
        limit = time.monotonic() + 30.0
        if deadline is not None:
            limit = max(min(limit, deadline), time.monotonic() + 5.0)
        while True:
            status = self._status()
            if status and str(status.get("status", "")).startswith("finished"):
                return status
            if time.monotonic() > limit:
                return None
            time.sleep(1.0)

    def _abort(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop every unfinished run on our SuperLink, then the ``flwr run`` CLI."""
        link = self.link
        try:
            data = _flwr_json(["ls", link.connection], link.env, link.run_dir, timeout=30)
            run_ids = {str(r.get("run-id")) for r in (data or {}).get("runs", [])
                       if not str(r.get("status", "")).startswith("finished")}
            if self.run_id is not None:
                run_ids.add(str(self.run_id))
            for run_id in sorted(run_ids):
                subprocess.run(  # noqa: S603
                    [_exe("flwr"), "stop", run_id, link.connection], env=link.env,
                    cwd=str(link.run_dir), capture_output=True, timeout=30,
                    stdin=subprocess.DEVNULL)
                log.info("stopped run %s", run_id)
        except (subprocess.TimeoutExpired, OSError) as err:
            log.warning("flwr stop failed: %s", err)
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=5)


# ------------------------------------------------------------------------ public API
class SimulationSuperLink(_FlowerLocal):
    """``flower-superlink --insecure --simulation --isolation subprocess --host 127.0.0.1
    --port <free> --database <run_dir>/.flwr/state.db``, cwd ``run_dir``, own session,
    log in ``run_dir``; connection ``spes-sim`` in ``<run_dir>/.flwr/config.toml``.

    ``__exit__`` stops it and everything it spawned (SuperExec, ServerApp, Ray).
    """

    connection = SIM_CONNECTION
    simulation = True

    def __enter__(self) -> SimulationSuperLink:
        super().__enter__()
        return self

    def run(self, app_dir: Path, run_config: Mapping[str, RunConfigValue], num_nodes: int,
            cpus_per_node: int = 1, timeout_s: float | None = None) -> int:
        """``flwr run <app_dir> spes-sim --run-config ... --federation-config
        "num-supernodes=N client-resources-num-cpus=C" --stream``; 0 on success."""
        fed = f"num-supernodes={int(num_nodes)} client-resources-num-cpus={int(cpus_per_node)}"
        return self._run(app_dir, run_config, timeout_s, fed)


def run_app(app_dir: Path, run_dir: Path, num_nodes: int,
            run_config: Mapping[str, RunConfigValue], cpus_per_node: int = 1,
            timeout_s: float | None = None, extra_env: Mapping[str, str] | None = None,
            console: str = "all") -> int:
    """Run a Flower app in a fresh local simulation and tear everything down.

    Returns 0 if the run finished ``completed``, 1 if it failed or was stopped,
    2 if ``flwr run`` could not start it, 124 on timeout. KeyboardInterrupt (and
    SIGTERM, as SystemExit) stop the run and the processes, then propagate.
    ``timeout_s`` bounds the run, not the SuperLink start/stop. ``extra_env`` is added to
    the environment of every Flower process (e.g. ``SPES_NODE_WORK_DIR`` for the nodes).

    ``console`` chooses what of the run's output reaches stdout: ``all`` (everything, the
    default), ``coordinator`` (the app's ``[spes]`` lines and errors) or
    ``coordinator+nodes``; see :class:`ConsoleFilter`. ``flwr-run.log`` gets everything.
    """
    check_run_config(Path(app_dir), run_config)  # fail before starting anything
    with SimulationSuperLink(Path(run_dir), extra_env=extra_env) as link:
        link.console = console
        return link.run(app_dir, run_config, num_nodes, cpus_per_node, timeout_s)


class LocalDeployment(_FlowerLocal):
    """A deployment on loopback: ``flower-superlink --isolation subprocess --host 127.0.0.1
    --port <P> --database ...`` plus N ``flower-supernode --superlink 127.0.0.1:<P>
    --node-config "partition-id=i num-partitions=N ..." --host 127.0.0.1 --port <free>``
    (each with cwd and ``FLWR_HOME`` under ``<run_dir>/supernode-<i>``); connection
    ``spes-local``. ``__enter__`` returns when all N SuperNodes are online.

    Without ``tls`` everything runs ``--insecure``. With ``tls`` the SuperLink serves HTTPS
    with those files and SuperNodes and ``flwr`` verify it with ``--root-certificates``.
    With ``node_keys`` (one ``(private, public)`` OpenSSH key pair per node) the SuperLink
    runs ``--enable-supernode-auth``, each public key is registered with ``flwr supernode
    register`` and each SuperNode signs in with ``--auth-supernode-private-key``.
    """

    connection = LOCAL_CONNECTION
    simulation = False

    def __init__(self, run_dir: Path, num_nodes: int, log_file: Path | None = None,
                 startup_timeout: float = 90.0, stop_grace: float = 10.0,
                 node_config: Mapping[str, RunConfigValue] | None = None,
                 tls: TlsFiles | None = None,
                 node_keys: Sequence[tuple[Path, Path]] | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        super().__init__(run_dir, log_file, startup_timeout, stop_grace, tls, extra_env)
        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        if node_keys is not None and len(node_keys) != num_nodes:
            raise ValueError(f"node_keys: {len(node_keys)} key pairs for {num_nodes} nodes")
        if node_keys is not None and tls is None:
            raise ValueError("node_keys (SuperNode authentication) needs tls")
        self.num_nodes = num_nodes
        self.node_config = dict(node_config or {})
        self.node_keys = None if node_keys is None else [(Path(a), Path(b)) for a, b in node_keys]
        self.node_ports: list[int] = []

    def __enter__(self) -> LocalDeployment:
        super().__enter__()
        return self

    def node_dir(self, i: int) -> Path:
        return self.run_dir / f"supernode-{i}"

    def node_log(self, i: int) -> Path:
        return self.run_dir / f"supernode-{i}.log"

    def _superlink_cmd(self, port: int) -> list[str]:
        cmd = super()._superlink_cmd(port)
        if self.node_keys is not None:
            cmd.append("--enable-supernode-auth")
        return cmd

    def register_supernode(self, public_key: Path) -> None:
        """``flwr supernode register <public_key> spes-local``; raises with Flower's
        message if the SuperLink does not accept the key."""
        res = subprocess.run(  # noqa: S603
            [_exe("flwr"), "supernode", "register", str(public_key), self.connection],
            env=self.env, cwd=str(self.run_dir), capture_output=True, text=True,
            timeout=60, stdin=subprocess.DEVNULL)
        if res.returncode != 0 or "registered successfully" not in res.stdout:
            raise RuntimeError(f"`flwr supernode register {public_key}` failed "
                               f"(exit {res.returncode}): {res.stdout}{res.stderr}")

    def start_supernode(self, i: int, num_partitions: int | None = None,
                        private_key: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``flower-supernode`` number ``i`` (partition id ``i``) against this
        SuperLink, signing in with ``private_key`` if given; log in ``node_log(i)``."""
        node_dir = self.node_dir(i)
        node_dir.mkdir(parents=True, exist_ok=True)
        port = find_free_port()
        self.node_ports.append(port)
        cfg = format_run_config({"partition-id": i,
                                 "num-partitions": num_partitions or self.num_nodes,
                                 **self.node_config})
        if cfg is None:
            raise ValueError("node_config strings may not contain both quote kinds")
        security = (["--insecure"] if self.tls is None
                    else ["--root-certificates", str(Path(self.tls.ca_cert).resolve())])
        if private_key is not None:
            security += ["--auth-supernode-private-key", str(Path(private_key).resolve())]
        cmd = [_exe("flower-supernode"), *security, "--superlink", self.address,
               "--node-config", cfg, "--host", HOST, "--port", str(port)]
        return self._group.start(f"flower-supernode-{i}", cmd,
                                 self._env(node_dir / ".flwr"), node_dir, self.node_log(i))

    def online_node_ids(self) -> list[int]:
        """Node ids the SuperLink lists as online (``flwr supernode list``)."""
        data = _flwr_json(["supernode", "list", self.connection], self.env,
                          self.run_dir, timeout=30)
        return [int(n["node-id"]) for n in (data or {}).get("nodes", [])
                if n.get("status") == "online"]

    def _after_superlink(self) -> None:
        procs = []
        for i in range(self.num_nodes):
            key = None
            if self.node_keys is not None:
                key, public = self.node_keys[i]
                self.register_supernode(public)
            procs.append(self.start_supernode(i, private_key=key))
        self.node_procs = procs  # so a fault test can kill one SuperNode
        deadline = time.monotonic() + self.startup_timeout
        online = 0
        while time.monotonic() < deadline:
            for i, proc in enumerate(procs):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"flower-supernode {i} exited with {proc.returncode}; log:\n"
                        + _tail(self.node_log(i)))
            online = len(self.online_node_ids())
            if online >= self.num_nodes:
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"only {online}/{self.num_nodes} SuperNodes online after "
            f"{self.startup_timeout:.0f}s; last log:\n"
            + _tail(self.node_log(self.num_nodes - 1)))

    def run(self, app_dir: Path, run_config: Mapping[str, RunConfigValue],
            timeout_s: float | None = None) -> int:
        """``flwr run <app_dir> spes-local --run-config ... --stream``; 0 on success."""
        return self._run(app_dir, run_config, timeout_s)
