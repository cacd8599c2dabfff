"""Tests for engine.launcher: real flower-superlink / flower-supernode processes on
127.0.0.1 running the toy app in tests/fixtures/toy_app (numpy only, no torch).

Every test is bounded (launcher start-up timeouts, run ``timeout_s``) and checks
that nothing it started survives: all processes started during a test inherit
``SPES_TEST_MARKER=<uuid>``; a sampler records the sessions such processes live in
(Ray's agents overwrite their environment block, so the marker alone is not enough)
and after the test no live process may carry the marker or sit in those sessions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from engine import flwr_config
from engine.deployment import LocalDeployment
from engine.flwr_config import TlsFiles
from engine.launcher import SimulationSuperLink, run_app
from federation.certs import write_node_key, write_server_certs
from federation.sign import main as sign_main

TOY_APP = Path(__file__).parent / "fixtures" / "toy_app"
NOTE = "model=tiny nodes=4"  # a string value with spaces and '=' must survive

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not (Path(sys.executable).parent / "flower-superlink").exists()
    and shutil.which("flower-superlink") is None,
    reason="needs Linux /proc and the Flower executables",
)


# --------------------------------------------------------------- leftover checking
def _marked_and_sessions(entry: bytes) -> dict[int, int]:
    """{pid: session} of live, non-zombie processes whose environ has ``entry``."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            if fields[0] in (b"Z", b"X"):
                continue
            with open(f"/proc/{name}/environ", "rb") as fh:
                if entry in fh.read().split(b"\0"):
                    found[int(name)] = int(fields[3])
        except (OSError, IndexError, ValueError):
            continue
    return found


def _live_in_sessions(sessions: set[int]) -> list[str]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            if fields[0] not in (b"Z", b"X") and int(fields[3]) in sessions:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ")[:120].decode(errors="replace")
                out.append(f"{name}: {cmd}")
        except (OSError, IndexError, ValueError):
            continue
    return out


@pytest.fixture
def no_leftovers(monkeypatch: pytest.MonkeyPatch):
    """Mark every process started during the test; fail if any outlives it."""
    value = uuid.uuid4().hex
    monkeypatch.setenv("SPES_TEST_MARKER", value)
    entry = f"SPES_TEST_MARKER={value}".encode()
    own_sid = os.getsid(0)
    sessions: set[int] = set()
    seen: set[int] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            found = _marked_and_sessions(entry)
            seen.update(found)
            sessions.update(sid for sid in found.values() if sid not in (own_sid, 0, 1))
            stop.wait(0.3)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    yield seen
    stop.set()
    sampler.join(5)
    left = {f"{pid} (marked)" for pid in _marked_and_sessions(entry)}
    left.update(_live_in_sessions(sessions))
    assert seen, "sampler saw no process at all"
    assert not left, f"processes outlived the test: {sorted(left)}"


@pytest.fixture
def flwr_home_untouched():
    """~/.flwr must not be created or modified (FLWR_HOME lives in the run dir)."""
    home = Path.home() / ".flwr"

    def snapshot() -> dict[str, float]:
        if not home.exists():
            return {}
        return {str(p): p.stat().st_mtime for p in [home, *home.rglob("*")]}

    before = snapshot()
    yield
    assert snapshot() == before


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------- fast unit tests
def test_format_run_config_roundtrips_through_flower_parser(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    cfg = {
        "a": 1,
        "b": NOTE,
        "c": True,
        "d": 1e-5,
        "e": "it's",
        "f": 'say "hi"',
        "g": "C:\\path",
        "h": "",
        "i": -2.5,
        "j": "tab\tand\nnewline",
        "k.l": 3,
    }
    text = flwr_config.format_run_config(cfg)
    assert text is not None and 'b="model=tiny nodes=4"' in text
    assert parse_config_args([text]) == cfg
    # both quote kinds cannot be inlined: falls back to a TOML file
    odd = {"x": "both ' and \"", "y": 1}
    assert flwr_config.format_run_config(odd) is None
    args = flwr_config.run_config_args(odd, tmp_path)
    assert args[0] == "--run-config" and args[1].endswith(".toml")
    assert parse_config_args([args[1]]) == odd
    with pytest.raises(ValueError):
        flwr_config.format_run_config({"bad key": 1})
    with pytest.raises(TypeError):
        flwr_config.format_run_config({"k": [1, 2]})  # type: ignore[dict-item]


def test_flwr_env_and_connection(tmp_path: Path) -> None:
    env = flwr_config.flwr_env(tmp_path / ".flwr")
    assert env["FLWR_HOME"] == str((tmp_path / ".flwr").resolve())
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert str(Path(sys.executable).parent) in env["PATH"].split(os.pathsep)
    flwr_config.write_connection(tmp_path / ".flwr", "spes-sim", "127.0.0.1:1234")
    flwr_config.write_connection(tmp_path / ".flwr", "spes-local", "127.0.0.1:5678")
    import tomllib

    data = tomllib.loads((tmp_path / ".flwr" / "config.toml").read_text())
    assert data["superlink"]["spes-sim"] == {"address": "127.0.0.1:1234", "insecure": True}
    assert data["superlink"]["spes-local"]["address"] == "127.0.0.1:5678"
    assert "local" not in data["superlink"]  # would auto-start a detached SuperLink
    port = flwr_config.find_free_port()
    assert 1024 < port < 65536


def test_unknown_run_config_key_fails_before_starting(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="bogus"):
        run_app(TOY_APP, tmp_path / "run", 2, {"bogus": 1}, timeout_s=30)
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------- simulation (real processes)
def test_run_app_success(tmp_path: Path, no_leftovers, flwr_home_untouched, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    out = tmp_path / "out.json"
    t0 = time.monotonic()
    rc = run_app(
        TOY_APP, run_dir, num_nodes=2, run_config={"out-file": str(out), "note": NOTE, "num-rounds": 2}, timeout_s=120
    )
    elapsed = time.monotonic() - t0
    assert rc == 0
    # each node adds partition-id + 1 per round: (1 + 2) then (3 + 1) + (3 + 2)
    assert _read(out) == {"rounds": 2, "note": NOTE, "pids": [0, 1], "sum": [9.0] * 3}
    assert (run_dir / ".flwr" / "config.toml").exists()
    assert (run_dir / ".flwr" / "state.db").exists()
    assert any((run_dir / ".flwr" / "apps").iterdir())  # FAB installed in our FLWR_HOME
    assert "Starting Flower Simulation" in capsys.readouterr().out  # logs were streamed
    print(f"\n[timing] toy simulation run_app total {elapsed:.1f}s")


def test_run_app_failing_serverapp(tmp_path: Path, no_leftovers) -> None:
    rc = run_app(
        TOY_APP,
        tmp_path / "run",
        num_nodes=2,
        run_config={"fail": True, "out-file": str(tmp_path / "x.json")},
        timeout_s=120,
    )
    assert rc == flwr_config.EXIT_RUN_FAILED
    assert not (tmp_path / "x.json").exists()


def test_run_app_timeout_stops_everything(tmp_path: Path, no_leftovers) -> None:
    out = tmp_path / "never.json"
    t0 = time.monotonic()
    rc = run_app(
        TOY_APP, tmp_path / "run", num_nodes=2, run_config={"num-rounds": 1_000_000, "out-file": str(out)}, timeout_s=10
    )
    assert rc == flwr_config.EXIT_TIMEOUT
    assert time.monotonic() - t0 < 60
    assert not out.exists()


def test_superlink_context_start_stop(tmp_path: Path, no_leftovers) -> None:
    t0 = time.monotonic()
    with SimulationSuperLink(tmp_path / "run") as link:
        started = time.monotonic() - t0
        assert link.processes()  # superlink + superexec
        cfg = (tmp_path / "run" / ".flwr" / "config.toml").read_text()
        assert f'address = "{link.address}"' in cfg
        t1 = time.monotonic()
    stopped = time.monotonic() - t1
    assert not link.processes()
    print(f"\n[timing] simulation SuperLink start {started:.1f}s, stop {stopped:.1f}s")


# ----------------------------------------------------------- deployment on loopback
def test_local_deployment_two_supernodes(tmp_path: Path, no_leftovers, flwr_home_untouched) -> None:
    """TLS SuperLink and two SuperNodes with registered keys (the app's own loopback run is the
    README recipe in test_documented_paths)."""
    out = tmp_path / "dep.json"
    certs = write_server_certs(tmp_path / "certs", ["127.0.0.1", "localhost"])
    tls = TlsFiles(certs["ca.crt"], certs["server.pem"], certs["server.key"])
    keys = [write_node_key(tmp_path / "keys", f"node{i}") for i in range(2)]
    t0 = time.monotonic()
    with LocalDeployment(tmp_path / "run", num_nodes=2, tls=tls, node_keys=keys) as dep:
        assert "running on https://127.0.0.1" in dep.log_file.read_text()  # the SuperLink serves TLS only
        assert len(dep.online_node_ids()) == 2  # both keys registered and accepted
        started = time.monotonic() - t0
        t1 = time.monotonic()
        rc = dep.run(TOY_APP, {"out-file": str(out), "note": NOTE}, timeout_s=120)
        ran = time.monotonic() - t1
        t2 = time.monotonic()
    stopped = time.monotonic() - t2
    assert rc == 0
    assert _read(out) == {"rounds": 2, "note": NOTE, "pids": [0, 1], "sum": [9.0] * 3}
    assert (tmp_path / "run" / "supernode-0.log").exists()
    print(f"\n[timing] deployment start {started:.1f}s, toy run {ran:.1f}s, stop {stopped:.1f}s")


# ------------------------------------------------------------- the pinned SuperNode
def _toy_copy(dest: Path, bump: str | None = None) -> Path:
    shutil.copytree(TOY_APP, dest)
    if bump is not None:  # one changed line: what a foreign bundle looks like to a node
        path = dest / "spes_toy.py"
        path.write_text(path.read_text().replace("+ pid + 1", bump))
    return dest


def test_pinned_supernode_runs_its_checkout_and_refuses_any_other_bundle(tmp_path: Path, no_leftovers) -> None:
    """`python -m client_app.supernode --pin <checkout>` (a real SuperNode and SuperExec): the
    checkout's bundle runs; a bundle with one line changed is refused before it is installed,
    and the node's log names the file. Flower's own `--trusted-entities` refuses even the
    checkout's bundle: a self-hosted SuperLink never attaches signatures (only Flower Hub's do)."""
    pinned, foreign = _toy_copy(tmp_path / "checkout"), _toy_copy(tmp_path / "foreign", "+ pid + 2")
    cfg = {"min-nodes": 1, "num-rounds": 1}
    cmd = [sys.executable, "-m", "client_app.supernode", "--pin", str(pinned)]
    with LocalDeployment(tmp_path / "pin", num_nodes=1, supernode_cmd=cmd) as dep:
        assert dep.run(pinned, {**cfg, "out-file": str(tmp_path / "ok.json")}, timeout_s=120) == 0
        assert _read(tmp_path / "ok.json")["sum"] == [1.0, 1.0, 1.0]
        assert dep.run(foreign, {**cfg, "out-file": str(tmp_path / "foreign.json")}, timeout_s=120) != 0
    log = dep.node_log(0).read_text()
    assert "differs from this node's checkout" in log and "changed: spes_toy.py" in log, log[-3000:]
    assert not (tmp_path / "foreign.json").exists()
    installed = [p.name for p in (dep.node_dir(0) / ".flwr" / "apps").iterdir()]
    assert len(installed) == 1, installed  # the foreign bundle never reached the disk as an app

    trusted = tmp_path / "trusted.yaml"
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    trusted.write_text(f"fed: {public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()}\n")
    flower_cmd = [str(Path(sys.executable).parent / "flower-supernode"), "--trusted-entities", str(trusted)]
    with LocalDeployment(tmp_path / "trusted", num_nodes=1, supernode_cmd=flower_cmd) as dep:
        assert dep.run(pinned, {**cfg, "out-file": str(tmp_path / "trusted.json")}, timeout_s=120) != 0
    assert "not supported by the connected SuperLink" in dep.node_log(0).read_text()


def test_trusting_supernode_runs_only_bundles_its_operator_signed(tmp_path: Path, no_leftovers) -> None:
    """`python -m client_app.supernode --trust operator.key.pub` (a real SuperNode and SuperExec):
    the bundle the operator signed with `python -m federation.sign app` runs; the same app signed
    by another key, and unsigned, are refused before they are installed."""
    for name in ("operator", "stranger"):
        assert sign_main(["key", name, "--out", str(tmp_path)]) == 0
    signed, foreign, unsigned = (_toy_copy(tmp_path / name) for name in ("signed", "foreign", "unsigned"))
    assert sign_main(["app", str(signed), "--key", str(tmp_path / "operator.key")]) == 0
    assert sign_main(["app", str(foreign), "--key", str(tmp_path / "stranger.key")]) == 0
    cfg = {"min-nodes": 1, "num-rounds": 1}
    cmd = [sys.executable, "-m", "client_app.supernode", "--trust", str(tmp_path / "operator.key.pub")]
    with LocalDeployment(tmp_path / "trust", num_nodes=1, supernode_cmd=cmd) as dep:
        assert dep.run(signed, {**cfg, "out-file": str(tmp_path / "ok.json")}, timeout_s=120) == 0
        for app in (foreign, unsigned):
            assert dep.run(app, {**cfg, "out-file": str(tmp_path / f"{app.name}.json")}, timeout_s=120) != 0
    assert _read(tmp_path / "ok.json")["sum"] == [1.0, 1.0, 1.0]
    assert not (tmp_path / "foreign.json").exists() and not (tmp_path / "unsigned.json").exists()
    log = dep.node_log(0).read_text()
    assert "app bundle signed by SHA256:" in log and "does not verify with any of this node's" in log, log[-3000:]
    assert "the app bundle is not signed" in log
    assert len(list((dep.node_dir(0) / ".flwr" / "apps").iterdir())) == 1  # only the signed bundle was installed


# ------------------------------------------------------------- the SuperLink's SuperExec watchdog
class _ReadmeSuperLink(LocalDeployment):
    """The README's SuperLink command, `python -m federation.superlink`, in place of flower-superlink."""

    def _superlink_cmd(self, port: int) -> list[str]:
        return [sys.executable, "-m", "federation.superlink", *super()._superlink_cmd(port)[1:]]


def _superexecs(port: int) -> list[int]:
    """Live SuperExec processes serving the SuperLink on `port`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(a.endswith(b"flower-superexec") for a in cmd[:2]) and f"127.0.0.1:{port}".encode() in cmd:
            found.append(int(entry.name))
    return found


def _wait_for(probe, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (found := probe()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def test_the_superlink_starts_a_new_superexec_when_its_superexec_dies(tmp_path: Path, no_leftovers) -> None:
    """Flower's SuperLink leaves runs `pending` forever once its SuperExec is gone; `python -m
    federation.superlink` logs the exit and starts another, and the next run completes."""
    with _ReadmeSuperLink(tmp_path / "run", num_nodes=1) as dep:
        (first,) = _wait_for(lambda: _superexecs(dep.port))
        os.kill(first, signal.SIGKILL)
        (second,) = _wait_for(lambda: [p for p in _superexecs(dep.port) if p != first])
        cfg = {"min-nodes": 1, "num-rounds": 1, "out-file": str(tmp_path / "out.json")}
        assert dep.run(TOY_APP, cfg, timeout_s=120) == 0
    assert _read(tmp_path / "out.json")["sum"] == [1.0, 1.0, 1.0]
    log = dep.log_file.read_text()
    assert f"SuperExec (pid {first}) exited with code -9" in log and f"SuperExec restarted (pid {second})" in log
