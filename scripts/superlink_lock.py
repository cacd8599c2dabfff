"""Try to reproduce the SuperLink's silent stall: under concurrent large replies its SuperExec was
seen to die with `sqlite3.OperationalError: database is locked`, after which new runs stayed
`pending`. Starts a SuperLink (file database, as the README's) and N SuperNodes on 127.0.0.1,
runs an app whose nodes all reply with `--reply-mb` MB at once for `--rounds` rounds, and submits
a small probe run every few seconds meanwhile; prints how each probe ended and every "database is
locked" line of the SuperLink's log.

    .venv/bin/python scripts/superlink_lock.py --nodes 8 --reply-mb 64 --arrays 400 --rounds 3
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.deployment import LocalDeployment  # noqa: E402
from engine.flwr_config import flower_exe, flwr_json  # noqa: E402

APP = """
import time
import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()

@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    deadline = time.time() + 60
    while len(nodes := list(grid.get_node_ids())) < int(cfg["min-nodes"]) and time.time() < deadline:
        time.sleep(0.2)
    for rnd in range(int(cfg["num-rounds"])):
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(rnd)) for n in nodes]
        replies = grid.send_and_receive(msgs, timeout=600)
        print(f"round {rnd}: {sum(r.has_content() for r in replies)}/{len(msgs)} replies", flush=True)

@client.train()
def train(msg: Message, context: Context) -> Message:
    mb, n = float(context.run_config["reply-mb"]), int(context.run_config["arrays"])
    rng = np.random.default_rng(0)
    arrays = [rng.random(max(1, int(mb * 2**20 / 8 / n))) for _ in range(n)]
    return Message(RecordDict({"a": ArrayRecord(arrays)}), reply_to=msg)
"""

PYPROJECT = """[project]
name = "lockrepro"
version = "0.1.0"
license = "Apache-2.0"
dependencies = ["flwr>=1.42", "numpy"]

[tool.flwr.app]
publisher = "spes"

[tool.flwr.app.components]
serverapp = "lockapp:server"
clientapp = "lockapp:client"

[tool.flwr.app.config]
num-rounds = 1
min-nodes = 1
reply-mb = 1.0
arrays = 1
"""


def _probe(dep: LocalDeployment, app: Path, results: list, stop: threading.Event, every_s: float) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        res = subprocess.run(
            [flower_exe("flwr"), "run", str(app), dep.connection, "--run-config", "num-rounds=0 min-nodes=0"],
            env=dep.env,
            cwd=str(dep.run_dir),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        found = re.search(r"Successfully started run (\d+)", res.stdout)
        run_id = found.group(1) if found else None
        status, deadline = "not started", time.monotonic() + 90
        while run_id and time.monotonic() < deadline and not status.startswith("finished"):
            data = flwr_json(["ls", dep.connection, "--run-id", run_id], dep.env, dep.run_dir, timeout=30) or {}
            status = next((r["status"] for r in data.get("runs", [])), "unknown")
            time.sleep(1)
        results.append((round(time.monotonic() - t0, 1), run_id, status))
        stop.wait(every_s)


def _patient(seconds: float) -> type[LocalDeployment]:
    """LocalDeployment whose SuperLink is `python -m federation.superlink --busy-timeout-s <seconds>`."""

    class Patient(LocalDeployment):
        def _superlink_cmd(self, port: int) -> list[str]:
            cmd = super()._superlink_cmd(port)
            return [sys.executable, "-m", "federation.superlink", "--busy-timeout-s", str(seconds), *cmd[1:]]

    return Patient


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--reply-mb", type=float, default=64.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--arrays", type=int, default=1, help="arrays per reply (a SPES reply carries hundreds)")
    ap.add_argument("--probe-every", type=float, default=5.0)
    ap.add_argument(
        "--busy-timeout-s", type=float, default=None, help="run python -m federation.superlink with this lock wait"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="spes-lock-") as tmp:
        app = Path(tmp) / "app"
        app.mkdir()
        (app / "lockapp.py").write_text(APP)
        (app / "pyproject.toml").write_text(PYPROJECT)
        probes: list = []
        stop = threading.Event()
        t0 = time.monotonic()
        deployment = LocalDeployment if args.busy_timeout_s is None else _patient(args.busy_timeout_s)
        with deployment(Path(tmp) / "run", num_nodes=args.nodes, startup_timeout=180) as dep:
            prober = threading.Thread(target=_probe, args=(dep, app, probes, stop, args.probe_every), daemon=True)
            prober.start()
            cfg = {"num-rounds": args.rounds, "min-nodes": args.nodes, "reply-mb": args.reply_mb, "arrays": args.arrays}
            rc = dep.run(app, cfg, timeout_s=1800)
            stop.set()
            prober.join(200)
            log = dep.log_file.read_text(errors="replace") if dep.log_file.exists() else ""
            locked = [line for line in log.splitlines() if "database is locked" in line]
        took = time.monotonic() - t0
        what = f"{args.nodes} nodes x {args.reply_mb} MB replies in {args.arrays} arrays x {args.rounds} rounds"
        what += "" if args.busy_timeout_s is None else f", busy_timeout {args.busy_timeout_s:g}s"
        print(f"{what}: exit {rc} in {took:.0f}s")
        for seconds, run_id, status in probes:
            print(f"probe run {run_id}: {status} after {seconds}s")
        print(f"'database is locked' lines: {len(locked)}")
        for line in locked[:10]:
            print("   ", line[:200])
    return 0


if __name__ == "__main__":
    sys.exit(main())
