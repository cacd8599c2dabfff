"""The node's resident worker (client_app/worker.py, worker_link.py, worker_channel.py).

Real SuperNodes on 127.0.0.1: with the default node-config (worker=auto) every node's messages
are served by one worker process that keeps its model between rounds; a worker killed by PID
mid-run is replaced (or its message runs in-process) and the run completes with global weights
bit-identical to the node code run in-process (the in-process engine, which equals the Flower
simulation: tests/test_engines.py; deterministic mode, the same torch threads). Real worker
processes for the lifecycle: a
worker of other code is replaced, the socket is closed to other users, frames are checked.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_launcher import flwr_home_untouched, no_leftovers  # noqa: F401 - fixtures

from client_app import worker_channel as channel
from client_app import worker_link
from faults.runs import MICRO, _rounds_logged, start_sim

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3

needs_flower = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (Path(sys.executable).parent / "flower-superlink").exists(),
    reason="needs Linux /proc and the Flower executables",
)


# The same torch threads everywhere: a matmul's sums follow the thread count, and the in-process
# reference must add up what the SuperNodes' processes do on any machine.
OVERRIDES = [*MICRO, "nodes=2", f"rounds={ROUNDS}", "strategy.local_steps=3", "deterministic=true", "train.threads=2"]


def _deployment_run(tmp: Path, node_config: dict, kill_worker_of: int | None = None) -> tuple[Path, Path]:
    """A 2-node, 3-round deterministic SPES run on real SuperNodes; optionally SIGKILL partition
    `kill_worker_of`'s worker once round 1 is logged. Returns (run dir, node work root)."""
    from engine.deployment import LocalDeployment

    overrides = [*OVERRIDES, "run_name=w"]
    run_config = {"overrides": " ".join(shlex.quote(o) for o in overrides), "output-dir": str(tmp / "outputs")}
    nodes = tmp / "nodes"
    run_dir = tmp / "outputs" / "w"

    def killer() -> None:
        deadline = time.monotonic() + 400
        while _rounds_logged(run_dir) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        (record,) = nodes.glob(f"*/partition-{kill_worker_of}/worker.json")
        os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)

    node_config = {"work-dir": str(nodes), "keep-state": True, **node_config}  # the workers' logs are read after
    with LocalDeployment(tmp / "flower", num_nodes=2, node_config=node_config) as dep:
        thread = threading.Thread(target=killer, daemon=True) if kill_worker_of is not None else None
        if thread:
            thread.start()
        assert dep.run(ROOT, run_config, timeout_s=600) == 0
        if thread:
            thread.join(10)
    return run_dir, nodes


def _served(nodes: Path, partition: int) -> list[dict]:
    (log,) = nodes.glob(f"*/partition-{partition}/worker-served.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()]


def _alongside(runs: dict, name: str, tmp: Path, node_config: dict) -> threading.Thread:
    thread = threading.Thread(target=lambda: runs.update({name: _deployment_run(tmp, node_config)}), daemon=True)
    thread.start()
    return thread


def _inprocess_run(tmp: Path) -> Path:
    """The same run with the node code in-process (engine=inprocess): the reference every worker run must equal."""
    out = tmp / "inprocess"
    proc = start_sim([*OVERRIDES, "engine=inprocess", "run_name=w", f"output_dir={out}"])
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    return out / "w"


@needs_flower
def test_workers_serve_every_round_survive_a_kill_and_change_no_number(tmp_path, no_leftovers):  # noqa: F811
    """Also: SuperNodes with gpus=2 (two gloo ranks per node, FSDP) end within 1e-5 of the in-process run."""
    # The gpus=2 run goes alongside (its own SuperLink and SuperNodes), and the in-process reference
    # meanwhile: the deployments mostly wait on Flower's polling.
    runs: dict = {}
    ranks = _alongside(runs, "ranks", tmp_path / "ranks", {"gpus": 2})
    reference = threading.Thread(target=lambda: runs.update(plain=_inprocess_run(tmp_path)), daemon=True)
    reference.start()
    run_dir, nodes = _deployment_run(tmp_path / "workers", {}, kill_worker_of=1)
    for thread in (ranks, reference):
        thread.join(600)
    assert runs.keys() == {"plain", "ranks"}, "a run alongside did not finish"
    # Partition 0: one worker served the whole run, and kept its model from round to round.
    served = _served(nodes, 0)
    assert len({s["pid"] for s in served}) == 1, served
    trains = [s for s in served if s["op"] == "train"]
    assert len(trains) == ROUNDS and [s["resident"] for s in trains] == [0.0] + [1.0] * (ROUNDS - 1)
    # Partition 1: its worker was killed after round 1; a new one (or the message in-process) took over.
    served = _served(nodes, 1)
    assert len({s["pid"] for s in served}) == 2, served
    assert [s["op"] for s in served].count("train") >= ROUNDS - 1
    last = f"round-{ROUNDS:06d}"
    a = load_file(run_dir / "checkpoint" / last / "params.safetensors")
    b = load_file(runs["plain"] / "checkpoint" / last / "params.safetensors")
    assert a.keys() == b.keys() and a
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])][:5]
    _two_ranks_matched(*runs["ranks"], b)


def test_worker_off_runs_every_message_in_process_even_under_flwr_clientapp(tmp_path, monkeypatch):
    from flwr.app import ConfigRecord, RecordDict

    from common import keys

    content = RecordDict({keys.CONFIG: ConfigRecord({keys.RUN_TOKEN: "r"})})
    monkeypatch.setattr(sys, "argv", ["/usr/bin/flwr-clientapp"])
    node = {"work-dir": str(tmp_path), "partition-id": 0, "num-partitions": 1}
    assert worker_link._worker_workdir(content, {**node, "worker": "off"}) is None
    for mode in ("auto", "on"):  # a SuperNode's message goes to the worker of its run's work dir
        workdir = worker_link._worker_workdir(content, {**node, "worker": mode})
        assert workdir is not None and workdir.is_dir() and workdir.is_relative_to(tmp_path)
    monkeypatch.setattr(sys, "argv", ["/usr/bin/python"])  # a simulation: auto runs in-process too
    assert worker_link._worker_workdir(content, {"worker": "auto"}) is None


def _two_ranks_matched(run_dir: Path, nodes: Path, plain: dict) -> None:
    """Every node's rounds ran on one worker and one helper rank, and the model is worker=off's within 1e-5."""
    for partition in (0, 1):
        trains = [s for s in _served(nodes, partition) if s["op"] == "train"]
        assert len({s["pid"] for s in trains}) == 1 and [s["resident"] for s in trains] == [0.0, 1.0, 1.0]
        (log,) = nodes.glob(f"*/partition-{partition}/rank-1.log")
        done = [line.split()[2] for line in log.read_text().splitlines() if "rank 1: train done" in line]
        assert len(done) == ROUNDS and len(set(done)) == 1, log.read_text()[-2000:]
    got = load_file(run_dir / "checkpoint" / f"round-{ROUNDS:06d}" / "params.safetensors")
    assert got.keys() == plain.keys()
    assert max(float((got[k] - plain[k]).abs().max()) for k in got) < 1e-5


# ---------------------------------------------------------------- real worker processes, no Flower run
def _start_worker(workdir: Path, root: Path = ROOT) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "client_app.worker", "--workdir", str(workdir), "--idle-exit", "120"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _older_app(tmp: Path) -> Path:
    """A copy of the node's code with one file changed: another version of the app."""
    import shutil

    for pkg in channel.NODE_PACKAGES:
        shutil.copytree(ROOT / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp / "conf").symlink_to(ROOT / "conf")
    with open(tmp / "client_app" / "handlers.py", "a") as fh:
        fh.write("# an older version\n")
    return tmp


def _wait_hello(workdir: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hello = worker_link._hello(channel.socket_path(workdir), workdir)
        if hello is not None:
            return hello
        time.sleep(0.2)
    raise AssertionError(f"no worker answered for {workdir}")


@pytest.fixture
def runtime_dir(monkeypatch):
    """A short XDG_RUNTIME_DIR of the test's own (pytest's tmp paths are too long for a socket)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="xdg-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_worker_of_other_code_is_replaced_and_exits(tmp_path, runtime_dir):
    workdir = tmp_path / "run-x" / "partition-0"
    stale = _start_worker(workdir, _older_app(tmp_path / "older"))
    fresh = None
    try:
        hello = _wait_hello(workdir)
        assert hello["pid"] == stale.pid and hello["identity"] != channel.identity(workdir)
        with worker_link._ready_worker(workdir, channel.identity(workdir), {}) as sock:
            sock.settimeout(10)
            channel.send(sock, {"op": "hello"})
            header, _ = channel.recv(sock)
        fresh = header["pid"]
        assert fresh != stale.pid and header["identity"] == channel.identity(workdir)
        assert stale.wait(timeout=30) == 0  # asked to stop, it stopped
    finally:
        stale.kill()
        if fresh:
            os.kill(fresh, signal.SIGTERM)


def test_the_socket_is_closed_to_other_users(tmp_path, runtime_dir):
    workdir = tmp_path / "run-y" / "partition-0"
    proc = _start_worker(workdir)
    try:
        _wait_hello(workdir)
        path = channel.socket_path(workdir)
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
        if os.getuid() != 0:
            pytest.skip("connecting as another user needs root here")
        code = (
            "import os, socket, sys; os.setgid(65534); os.setuid(65534); s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\n"
        )
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=30)
        assert done.returncode == 3, done.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_channel_dir_refuses_one_others_can_enter(runtime_dir, monkeypatch):
    (runtime_dir / "spes-workers").mkdir(mode=0o755)
    os.chmod(runtime_dir / "spes-workers", 0o755)
    with pytest.raises(channel.WorkerUnavailable, match="mode 0700"):
        channel.channel_dir()
    # Where $XDG_RUNTIME_DIR is too deep for a socket path, the sockets go under /tmp instead.
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/" + "d" * 90)
    assert channel.channel_dir() == Path(f"/tmp/spes-workers-{os.getuid()}")
    assert len(str(channel.socket_path(Path("/any/work/dir")))) <= channel.MAX_SOCKET_PATH


def test_frames_round_trip_and_malformed_ones_are_refused():
    a, b = socket.socketpair()
    with a, b:
        channel.send(a, {"op": "train", "n": 1}, [b"\x00\x01", b"payload"])
        assert channel.recv(b) == ({"op": "train", "n": 1}, b"\x00\x01payload")
        a.sendall(b"XXXX" + bytes(12))
        with pytest.raises(ValueError, match="not a worker-channel frame"):
            channel.recv(b)
        a.sendall(channel.MAGIC + (channel.MAX_HEADER + 1).to_bytes(4, "little") + bytes(8))
        with pytest.raises(ValueError, match="frame header"):
            channel.recv(b)
        a.sendall(channel.MAGIC + (5).to_bytes(4, "little") + (0).to_bytes(8, "little") + b"[1,2]")
        with pytest.raises(ValueError, match="not a JSON object"):
            channel.recv(b)
        channel.send(a, {"op": "x"}, [b"abc"])
        a.shutdown(socket.SHUT_WR)
        assert channel.recv(b) == ({"op": "x"}, b"abc")
        with pytest.raises(ConnectionError):
            channel.recv(b)


def test_unknown_worker_mode_is_refused_with_the_key_named():
    from flwr.app import RecordDict

    with pytest.raises(ValueError, match="node-config worker must be one of auto, on, off"):
        worker_link._worker_workdir(RecordDict(), {"worker": "yes"})


def test_one_worker_per_node_and_it_leaves_when_idle(tmp_path, runtime_dir):
    workdir = tmp_path / "run-z" / "partition-0"
    first = _start_worker(workdir)
    try:
        _wait_hello(workdir)
        second = _start_worker(workdir)
        assert second.wait(timeout=60) == channel.ANOTHER_SERVES  # the lock is held: it does not serve
        assert _wait_hello(workdir)["pid"] == first.pid
    finally:
        first.terminate()
        assert first.wait(timeout=30) == 0
    assert not channel.socket_path(workdir).exists()  # a worker that leaves takes its socket along
    cmd = [sys.executable, "-m", "client_app.worker", "--workdir", str(workdir), "--idle-exit", "1"]
    idle = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert idle.returncode == 0 and "no message for" in idle.stderr


def test_content_travels_whole_and_a_layout_that_disagrees_is_refused():
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    content = RecordDict(
        {
            "config": ConfigRecord({"owned": [0, 3], "token": "run-1", "full": True}),
            "arrays": ArrayRecord({"a": Array(np.arange(6, dtype=np.float32).reshape(2, 3)), "b": Array(np.ones(0))}),
            "metrics": MetricRecord({"loss": 1.5}),
            "more": ArrayRecord({"c": Array(np.array([7], dtype=np.int64))}),
        }
    )
    layout, parts = channel.encode_content(content)
    body = bytearray(b"".join(parts))
    back = channel.decode_content(json.loads(json.dumps(layout)), body)  # the layout travels as JSON
    assert dict(back["config"]) == {"owned": [0, 3], "token": "run-1", "full": True}
    assert dict(back["metrics"]) == {"loss": 1.5}
    assert back["arrays"]["a"].numpy().tolist() == [[0, 1, 2], [3, 4, 5]] and back["arrays"]["b"].numpy().size == 0
    assert back["more"]["c"].numpy().tolist() == [7]
    layout["arrays"]["arrays"][0]["bytes"] -= 1
    with pytest.raises(ValueError, match="covers"):
        channel.decode_content(layout, body)
    with pytest.raises(ValueError, match="malformed content layout"):
        channel.decode_content({"records_bytes": 0}, bytearray())


def test_round_breakdown_follows_the_slowest_node_by_hand():
    from bench.worker import breakdown

    def row(wall, sent, exchange):
        phases = {"admit_s": 0.5, "configure_s": 0.25, "aggregate_s": 1.0, "central_eval_s": 2.0}
        return {"wall_s": wall, "timing": {**phases, "train_sent_at": sent, "train_exchange_s": exchange}}

    rows = [row(10.0, 0.0, 6.0), row(30.0, 100.0, 12.0)]  # round 2: 20 s, replies all in at 112

    def train(started, called, received, handler):
        timing = {"process_started_at": started, "app_called_at": called, "received_at": received}
        return {"op": "train", "time": received + handler, "timing": {**timing, "handler_s": handler}}

    served = {
        0: [train(1, 2, 2.5, 1.0), train(101.0, 104.0, 104.5, 5.0)],  # round 2 ends at 109.5
        1: [train(1, 2, 2.5, 1.0), train(102.0, 103.0, 103.25, 3.0)],  # ends at 106.25
    }
    b = breakdown(rows, served)
    assert b["flower_launch_s"] == 1.0 and b["clientapp_start_s"] == 3.0 and b["handoff_s"] == 0.5
    assert b["node_s"] == 5.0 and b["flower_reply_s"] == 112.0 - 109.5
    assert b["coordinator_s"] == 3.75 and b["round_s"] == 20.0 and b["other_s"] == 20.0 - 3.75 - 12.0
    without = breakdown(rows, {})
    assert without["flower_and_node_s"] == 12.0 and "node_s" not in without


def test_gpus_is_checked_and_needs_the_worker():
    from flwr.app import ConfigRecord, RecordDict

    from client_app.node_settings import NodeSetupError, node_gpus

    assert node_gpus({}) == 1 and node_gpus({"gpus": 4}) == 4 and node_gpus({"gpus": "2"}) == 2
    for bad in (0, 65, True, 1.5, "two"):
        with pytest.raises(NodeSetupError, match="node-config gpus must be an integer"):
            node_gpus({"gpus": bad})
    content = RecordDict({"config": ConfigRecord({"run-token": "r"})})
    node = {"partition-id": 0, "num-partitions": 1, "gpus": 2}
    # Outside flwr-clientapp (a simulation, this test) worker=auto runs in-process: several ranks cannot.
    with pytest.raises(NodeSetupError, match="gpus=2 needs the node worker"):
        worker_link.run("train", content, node)
    with pytest.raises(NodeSetupError, match="gpus=2 needs the node worker"):
        worker_link.run("train", content, {**node, "worker": "off"})
