"""Where a message runs: in this process, or in the node's resident worker (client_app/worker.py).

node-config `worker`: `auto` (default) uses a worker where this process is Flower's per-message
`flwr-clientapp` (deployment), and runs in-process elsewhere (simulation actors and the
in-process engine already keep nodes in memory, `train.resident`); `on` always, `off` never.
`worker-idle-s` (default 1800): the worker exits after that long without a message.

A worker that is not there is started (in the SuperNode's process group, so it stops with it)
and waited for; one of other code or another interpreter is asked to stop and replaced; one that
does not answer is killed. When none can serve — it died mid-message, say — the message runs
in-process as it would without workers, with a log line: a worker can only save time.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client_app import worker_channel as channel
from client_app.node_settings import NodeSettings, NodeSetupError, node_gpus
from common import keys

log = logging.getLogger("spes.node")
MODES = ("auto", "on", "off")
HELLO_TIMEOUT_S = 10.0
STARTUP_TIMEOUT_S = 300.0  # a worker imports torch and transformers before it listens


def run(op: str, content, node_config: Mapping[str, Any]):
    """The reply content to a message's content, from the worker where one serves, else in-process."""
    called_at = time.time()
    workdir = _worker_workdir(content, node_config)
    gpus = node_gpus(node_config)
    if workdir is not None:
        try:
            return _via_worker(op, content, dict(node_config), workdir, called_at, gpus)
        except channel.WorkerUnavailable as exc:
            if gpus > 1:  # in-process would train on one device, with memory sized for several
                raise RuntimeError(f"gpus={gpus}: the node's ranks run in its worker, and none serves ({exc})") from exc
            log.warning("node worker unavailable (%s): this message runs in-process", exc)
    elif gpus > 1:
        raise NodeSetupError(f"node-config gpus={gpus} needs the node worker (worker=auto in deployment, or on)")
    from client_app.handlers import HANDLERS

    return HANDLERS[op](content, node_config)


def _worker_workdir(content, node_config: Mapping[str, Any]) -> Path | None:
    """The node's work dir for this run where a worker is to serve the message, else None."""
    mode = str(node_config.get("worker", "auto"))
    if mode not in MODES:
        raise NodeSetupError(f"node-config worker must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or (mode == "auto" and Path(sys.argv[0]).name != "flwr-clientapp"):
        return None
    cfg = content.config_records.get(keys.CONFIG) if keys.CONFIG in content.config_records else None
    if cfg is None or keys.RUN_TOKEN not in cfg:
        return None  # not a message of ours: the handler reports it
    workdir = NodeSettings.from_node_config(node_config).workdir(str(cfg[keys.RUN_TOKEN]))
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def _via_worker(op: str, content, node_config: dict[str, Any], workdir: Path, called_at: float, gpus: int):
    ident = channel.identity(workdir, gpus)
    sock = _ready_worker(workdir, ident, node_config)
    with sock:
        sock.settimeout(None)  # a round takes as long as it takes; a worker that dies closes the channel
        try:
            layout, parts = channel.encode_content(content)
            header = {"op": op, "identity": ident, "node_config": node_config, "content": layout}
            header["timing"] = {"process_started_at": _process_started_at(), "app_called_at": called_at}
            channel.send(sock, header, parts)
            header, body = channel.recv(sock)
        except (ConnectionError, OSError) as exc:
            raise channel.WorkerUnavailable(f"the worker went away mid-message: {exc}") from exc
    if header.get("ok"):
        return channel.decode_content(header.get("content"), body)
    if header.get("stale"):
        raise channel.WorkerUnavailable("the worker was replaced by one of other code mid-message")
    raise RuntimeError(f"node worker: {header.get('error')}")


def _process_started_at() -> float | None:
    """When this process started (Unix seconds), from /proc: what Flower's launch of it took is
    before, what its imports took after (bench/worker.py lines the two up)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _ready_worker(workdir: Path, ident: dict[str, str], node_config: dict[str, Any]) -> socket.socket:
    """A connection to a worker of this identity, starting (or replacing) one where needed."""
    path = channel.socket_path(workdir)
    hello = _hello(path, workdir)
    if hello is not None and hello.get("identity") != ident:
        log.info("node worker %s runs other code or another interpreter: replacing it", hello.get("pid"))
        _stop(path, hello)
        hello = None
    if hello is None:
        proc = _start(workdir, ident, node_config)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while hello is None and time.monotonic() < deadline and proc.poll() in (None, channel.ANOTHER_SERVES):
            time.sleep(0.2)
            hello = _hello(path, workdir)
        if hello is None and proc.poll() not in (None, channel.ANOTHER_SERVES):
            raise channel.WorkerUnavailable(f"the worker exited with {proc.returncode} (see {workdir / 'worker.log'})")
        if hello is None:
            raise channel.WorkerUnavailable(f"no worker answered on {path} within {STARTUP_TIMEOUT_S:.0f} s")
    return _connect(path)


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HELLO_TIMEOUT_S)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise channel.WorkerUnavailable(f"cannot connect to {path}: {exc}") from exc
    return sock


def _hello(path: Path, workdir: Path) -> dict[str, Any] | None:
    """The worker's answer, None where none listens; a worker that accepts but does not answer is killed."""
    if not path.exists():
        return None
    try:
        sock = _connect(path)
    except channel.WorkerUnavailable:
        return None
    with sock:
        try:
            channel.send(sock, {"op": "hello"})
            header, _ = channel.recv(sock)
        except TimeoutError:
            _kill_wedged(workdir)
            return None
        except (ConnectionError, OSError, ValueError):
            return None
    return header if header.get("ok") else None


def stop_worker(workdir: Path) -> bool:
    """Ask the worker serving `workdir` to exit and wait for it; False where none was serving."""
    path = channel.socket_path(workdir)
    hello = _hello(path, workdir)
    if hello is not None:
        _stop(path, hello)
    return hello is not None


def _stop(path: Path, hello: dict[str, Any]) -> None:
    try:
        with _connect(path) as sock:
            channel.send(sock, {"op": "stop"})
            channel.recv(sock)
    except (channel.WorkerUnavailable, ConnectionError, OSError, ValueError):
        pass
    pid, workdir = hello.get("pid"), Path(str(hello.get("identity", {}).get("workdir")))
    deadline = time.monotonic() + 30.0
    while isinstance(pid, int) and _is_worker(pid, workdir) and time.monotonic() < deadline:
        time.sleep(0.2)


def _kill_wedged(workdir: Path) -> None:
    """SIGKILL the node's worker that accepts but does not answer (its pid from worker.json)."""
    pid = _recorded_pid(workdir)
    if pid is not None and _is_worker(pid, workdir):
        log.warning("node worker %d does not answer: killing it", pid)
        os.kill(pid, signal.SIGKILL)


def _recorded_pid(workdir: Path) -> int | None:
    try:
        pid = json.loads((workdir / "worker.json").read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


def _is_worker(pid: int, workdir: Path) -> bool:
    """Whether `pid` is a live worker process for this work dir (its command line says so)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"client_app.worker" in cmd and str(workdir).encode() in cmd


def _start(workdir: Path, ident: dict[str, str], node_config: dict[str, Any]) -> subprocess.Popen:
    """Start the worker that `ident` names (its ranks: node-config gpus, already checked)."""
    root = str(Path(__file__).resolve().parent.parent)  # Flower installs the app outside sys.path's defaults
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    idle = str(float(node_config.get("worker-idle-s", 1800)))
    cmd = [sys.executable, "-m", "client_app.worker", "--workdir", str(workdir), "--parent", str(os.getppid())]
    with open(workdir / "worker.log", "ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [*cmd, "--idle-exit", idle, "--gpus", ident["gpus"]],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
        )
    log.info("started the node worker for %s (log: %s)", workdir, workdir / "worker.log")
    return proc
