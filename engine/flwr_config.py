"""Flower's command-line plumbing: process environment, `--run-config` format, connections in
`$FLWR_HOME/config.toml`, TLS files, and `flwr ... --format json` (no torch here).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("engine.launcher")

SIM_CONNECTION = "spes-sim"
LOCAL_CONNECTION = "spes-local"
HOST = "127.0.0.1"

RunConfigValue = str | int | float | bool

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_NOT_STARTED = 2
EXIT_TIMEOUT = 124

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


# --------------------------------------------------------------------------- basics
def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def flower_exe(name: str) -> str:
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


def log_tail(path: Path, lines: int = 40) -> str:
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


def run_config_args(run_config: Mapping[str, RunConfigValue], run_dir: Path) -> list[str]:
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


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> Path:
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
    superlink[name] = (
        {"address": address, "insecure": True}
        if root_certificates is None
        else {"address": address, "root-certificates": str(Path(root_certificates).resolve())}
    )
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
        return [
            "--ssl-ca-certfile",
            str(self.ca_cert),
            "--ssl-certfile",
            str(self.server_cert),
            "--ssl-keyfile",
            str(self.server_key),
        ]


# ------------------------------------------------------------------ flwr CLI helpers
def flwr_json(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60.0) -> dict[str, Any] | None:
    """Run ``flwr <args> --format json`` and parse its JSON; None on failure."""
    try:
        res = subprocess.run(  # noqa: S603
            [flower_exe("flwr"), *args, "--format", "json"],
            env=env,
            cwd=str(cwd),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
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


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout: float, ca_cert: Path | None = None) -> bool:
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if ca_cert is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca_cert))))
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
