"""Deployment round time outside the training loop: the node's resident worker against a fresh process.

    python -m bench.worker [--preset tiny] [--nodes 4] [--h 25 100] [--rounds 3]

For each H, two runs on real SuperNodes on 127.0.0.1 (engine.deployment.LocalDeployment), the
same overrides, deterministic: node-config `worker=auto` (the default: a worker per node keeps
the imports and the model) and `worker=off` (every message in Flower's fresh `flwr-clientapp`
process imports torch and rebuilds the node from disk). Per round from 2 on (round 1 starts the
workers either way): the coordinator's round time minus the longest node training loop, i.e.
everything a round costs besides training, coordinator evaluation included (the same in both
runs), and its share of the round. The final losses must agree (the worker changes no number).
Writes benchmarks/worker.json and prints a table; benchmark alone on the machine. All nodes share
this machine, each process with --threads torch threads: on 2 cores, 4 nodes contend for the CPU,
so training takes longer than on a node's own machine; both runs contend alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp: Path, overrides: list[str], worker: str, threads: int) -> dict:
    from engine.deployment import LocalDeployment

    run_config = {"overrides": " ".join(shlex.quote(o) for o in overrides), "output-dir": str(tmp / "outputs")}
    node_config = {"work-dir": str(tmp / "nodes"), "worker": worker, "keep-state": True}  # served logs read after
    t0 = time.monotonic()
    # Several nodes on one machine: each with its own thread budget, else their OpenMP pools thrash.
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    nodes = int(_value(overrides, "nodes"))
    with LocalDeployment(tmp / "flower", num_nodes=nodes, node_config=node_config, extra_env=env) as dep:
        if dep.run(ROOT, run_config, timeout_s=3600) != 0:
            raise RuntimeError(f"the worker={worker} run failed; see {tmp / 'flower'}")
    rows = [json.loads(x) for x in (tmp / "outputs" / "b" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp / "outputs" / "b" / "summary.json").read_text())
    served = {
        int(p.parent.name.split("-")[1]): [json.loads(x) for x in p.read_text().splitlines()]
        for p in (tmp / "nodes").glob("*/partition-*/worker-served.jsonl")
    }
    return {"rows": rows, "summary": summary, "total_s": time.monotonic() - t0, "served": served}


def _value(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}="))


def round_figures(rows: list[dict]) -> dict:
    """Rounds 2..: seconds per round, longest node training loop, the rest and its share (medians)."""
    walls = [b["wall_s"] - a["wall_s"] for a, b in zip(rows, rows[1:], strict=False)]
    trains = [max(n["train_seconds"] for n in r["nodes"].values()) for r in rows[1:]]
    outside = [w - t for w, t in zip(walls, trains, strict=True)]
    return {
        "round_s": statistics.median(walls),
        "train_s": statistics.median(trains),
        "outside_s": statistics.median(outside),
        "outside_share": statistics.median(o / w for o, w in zip(outside, walls, strict=True)),
        "rounds_measured": len(walls),
    }


PHASES = ("flower_launch_s", "clientapp_start_s", "handoff_s", "node_s", "flower_reply_s", "coordinator_s", "other_s")
COORDINATOR = ("admit_s", "configure_s", "aggregate_s", "federated_eval_s", "central_eval_s")


def breakdown(rows: list[dict], served: dict[int, list[dict]]) -> dict:
    """Where rounds 2.. went (medians), following the round's slowest node.

    From the coordinator's timing (metrics.jsonl) and, with workers, each node's
    worker-served.jsonl: flower_launch_s, the train message leaving the coordinator until its
    `flwr-clientapp` process exists (SuperLink, the SuperNode's 3 s poll, the SuperExec's 1 s
    poll, the process launch); clientapp_start_s, that process's interpreter and imports and
    Flower pulling the message from the SuperNode, until our ClientApp function is called;
    handoff_s, the content handed to the worker (hello, encoding, the socket); node_s, the
    worker's handler (the round); flower_reply_s, back until the coordinator holds every reply
    (the channel back, the SuperNode's push, the ServerApp's 3 s poll of the SuperLink);
    coordinator_s, its phases (COORDINATOR, each also given); other_s, the rest of the round
    (checkpoint, logs). Without workers the node side is one figure, flower_and_node_s.
    """
    trains = {p: [x for x in lines if x["op"] == "train"] for p, lines in served.items()}
    per_round: dict[str, list[float]] = {}
    for i in range(1, len(rows)):
        t = rows[i]["timing"]
        exchange_end = t["train_sent_at"] + t["train_exchange_s"]
        coordinator = sum(v for k, v in t.items() if k.endswith("_s") and k not in ("train_exchange_s",))
        figures = {"round_s": rows[i]["wall_s"] - rows[i - 1]["wall_s"], "coordinator_s": coordinator}
        figures.update({k: t.get(k, 0.0) for k in COORDINATOR})
        figures["other_s"] = figures["round_s"] - coordinator - t["train_exchange_s"]
        lines = [x[i]["timing"] | {"end": x[i]["time"]} for x in trains.values() if len(x) > i]
        if lines and all("process_started_at" in x for x in lines):
            last = max(lines, key=lambda x: x["end"])
            figures["flower_launch_s"] = last["process_started_at"] - t["train_sent_at"]
            figures["clientapp_start_s"] = last["app_called_at"] - last["process_started_at"]
            figures["handoff_s"] = last["received_at"] - last["app_called_at"]
            figures["node_s"] = last["handler_s"]
            figures["flower_reply_s"] = exchange_end - last["received_at"] - last["handler_s"]
        else:
            figures["flower_and_node_s"] = t["train_exchange_s"]
        for k, v in figures.items():
            per_round.setdefault(k, []).append(v)
    setups = [x["timing"] for lines in served.values() for x in lines if x["op"] == "setup"]
    if setups and all("process_started_at" in x for x in setups):  # the same, for a message of a few kB
        per_round["setup_clientapp_start_s"] = [x["app_called_at"] - x["process_started_at"] for x in setups]
    return {k: statistics.median(v) for k, v in per_round.items()}


def channel_seconds(megabytes: int) -> dict:
    """What the worker channel adds per message of this size: the content serialized (Flower's
    protobuf), sent over a Unix socket pair and parsed, both ways, as the worker link does."""
    import socket
    import threading

    import numpy as np
    from flwr.app import Array, ArrayRecord, RecordDict

    from client_app import worker_channel as channel

    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(megabytes * 2**18, dtype=np.float32))})})
    a, b = socket.socketpair()

    def echo_once() -> None:
        header, body = channel.recv(b)
        channel.send(b, header, [body])

    echo = threading.Thread(target=echo_once, daemon=True)
    t0 = time.perf_counter()
    echo.start()
    layout, parts = channel.encode_content(content)
    channel.send(a, {"op": "train", "content": layout}, parts)
    header, body = channel.recv(a)
    back = channel.decode_content(header["content"], body)
    took = time.perf_counter() - t0
    a.close()
    b.close()
    assert back["arrays"]["w"].numpy().nbytes == megabytes * 2**20
    return {"megabytes": megabytes, "round_trip_s": took, "gb_per_s_each_way": 2 * megabytes / 1024 / took}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--h", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each process (OMP_NUM_THREADS)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "worker.json"))
    ap.add_argument("--channel-mb", type=int, default=512, help="message size of the channel measurement")
    ap.add_argument("--channel-only", action="store_true", help="only the channel measurement (printed)")
    a = ap.parse_args(argv)
    if a.channel_only:
        print(json.dumps(channel_seconds(a.channel_mb)))
        return 0
    from bench.report import machine_info
    from common.atomic import write_json_atomic

    out = {"machine": machine_info(), "load_before": os.getloadavg(), "preset": a.preset, "nodes": a.nodes}
    out.update({"threads_per_process": a.threads, "by_h": {}})
    out["channel"] = channel_seconds(a.channel_mb)
    for h in a.h:
        overrides = [
            f"model={a.preset}",
            f"nodes={a.nodes}",
            f"rounds={a.rounds}",
            f"strategy.local_steps={h}",
            "deterministic=true",
            "run_name=b",
        ]
        cell = {"overrides": overrides}
        for worker in ("auto", "off"):
            with tempfile.TemporaryDirectory(prefix=f"spes-bench-worker-{worker}-") as tmp:
                print(f"[bench.worker] H={h} worker={worker} ...", flush=True)
                run = _run(Path(tmp), overrides, worker, a.threads)
            cell[worker] = {**round_figures(run["rows"]), "final_val_loss": run["summary"]["final_val_loss"]}
            cell[worker]["breakdown"] = breakdown(run["rows"], run["served"])
            print(f"[bench.worker] H={h} worker={worker}: {json.dumps(cell[worker])}", flush=True)
        cell["same_final_loss"] = cell["auto"]["final_val_loss"] == cell["off"]["final_val_loss"]
        cell["outside_saved_s"] = cell["off"]["outside_s"] - cell["auto"]["outside_s"]
        out["by_h"][str(h)] = cell
    out["load_after"] = os.getloadavg()
    write_json_atomic(Path(a.out), out)
    _print_table(out)
    return 0


def _print_table(out: dict) -> None:
    print(f"\n{out['preset']}, {out['nodes']} nodes; median over rounds 2..; load before {out['load_before'][0]:.2f}")
    print("| H | worker | s/round | training (longest node) | outside training | share |")
    print("|---:|---|---:|---:|---:|---:|")
    for h, cell in out["by_h"].items():
        for w in ("auto", "off"):
            c = cell[w]
            print(
                f"| {h} | {w} | {c['round_s']:.2f} | {c['train_s']:.2f} | {c['outside_s']:.2f} | "
                f"{100 * c['outside_share']:.1f} % |"
            )
    print("\nwhere a round went (seconds, median over rounds 2.., the round's slowest node):")
    columns = (*PHASES, "flower_and_node_s", *COORDINATOR, "setup_clientapp_start_s")
    print("| H | worker | " + " | ".join(columns) + " |")
    print("|---:|---|" + "---:|" * len(columns))
    for h, cell in out["by_h"].items():
        for w in ("auto", "off"):
            b = cell[w].get("breakdown", {})
            print(f"| {h} | {w} | " + " | ".join(f"{b[k]:.2f}" if k in b else "-" for k in columns) + " |")


if __name__ == "__main__":
    sys.exit(main())
