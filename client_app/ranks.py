"""The ranks of a node with several GPUs (node-config `gpus=n`): the worker is rank 0, n - 1 helpers.

The node's worker (client_app/worker.py) starts the helpers once, when it starts, and they live
as long as it does, so a multi-GPU node keeps its shards, optimizer and imports between rounds
like a one-GPU node. Every message the worker serves is handed to each helper over a socket pair
(the worker channel's frames: arrays' bytes and protobuf records, never pickle) before the
worker runs it itself; every rank then runs the same handler on the same content, and the model
code splits the work (training/parallel.py). Only rank 0's reply leaves the node.

The ranks meet in a torch.distributed FileStore in the node's work dir (nothing listens on a
network port) and talk over NCCL for CUDA tensors and gloo for CPU ones. A helper exits when its
socket closes or the worker is gone; a failed message on one rank is logged there and the worker
reports its own. Helpers run with CUDA_VISIBLE_DEVICES as the SuperNode has it and use device
`cuda:<rank>`.

    python -m client_app.ranks --workdir <node work dir> --rank <r> --world <n> --store <file> --fd <k> --parent <pid>
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from client_app import worker_channel as channel
from client_app.background_save import process_alive, process_start_time

log = logging.getLogger("spes.ranks")
# A rank that waits longer than this in a collective (another rank failed or hangs) gives up.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def _init_group(store_path: Path, rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        if torch.cuda.device_count() < world:
            raise RuntimeError(f"gpus={world} but this node sees {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    store = dist.FileStore(str(store_path), world)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)


class RankGroup:
    """Rank 0's side: the helper processes and their sockets."""

    def __init__(self, workdir: Path, world: int) -> None:
        self.workdir, self.world = workdir, world
        self.store = workdir / f"ranks-{os.getpid()}.store"
        self.store.unlink(missing_ok=True)
        self.links: list[socket.socket] = []
        self.procs: list[subprocess.Popen] = []

    def start(self) -> RankGroup:
        """Start the helpers and join them in one process group (rank 0 is this process)."""
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        for rank in range(1, self.world):
            mine, theirs = socket.socketpair()
            cmd = [sys.executable, "-m", "client_app.ranks", "--workdir", str(self.workdir), "--rank", str(rank)]
            cmd += ["--world", str(self.world), "--store", str(self.store), "--fd", str(theirs.fileno())]
            with open(self.workdir / f"rank-{rank}.log", "ab") as out:
                proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                    [*cmd, "--parent", str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=root,
                    pass_fds=(theirs.fileno(),),
                )
            theirs.close()
            self.links.append(mine)
            self.procs.append(proc)
        _init_group(self.store, 0, self.world)
        log.info("ranks 1-%d joined (pids %s)", self.world - 1, [p.pid for p in self.procs])
        return self

    def forward(self, header: dict, body: bytearray) -> None:
        """Hand one message to every helper before rank 0 runs it."""
        for link in self.links:
            channel.send(link, header, [bytes(body)] if body else [])

    def stop(self) -> None:
        for link in self.links:
            with contextlib.suppress(OSError):  # a helper already gone
                channel.send(link, {"op": "stop"})
            link.close()
        deadline = time.monotonic() + 30.0
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
        self.store.unlink(missing_ok=True)


def _watch_parent(parent: int) -> None:
    """Exit when the worker is gone (killed mid-collective, say): nothing else would free the GPU."""
    start = process_start_time(parent)

    def watch() -> None:
        while process_alive(parent, start):
            time.sleep(1.0)
        log.info("the worker (pid %d) is gone: exiting", parent)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def serve(link: socket.socket, rank: int) -> None:
    """Run every message rank 0 hands over, until it says stop or the socket closes."""
    from client_app.handlers import HANDLERS

    while True:
        try:
            header, body = channel.recv(link)
        except (ConnectionError, OSError):
            return
        op, node_config = header.get("op"), header.get("node_config")
        if op == "stop":
            return
        if op not in HANDLERS or not isinstance(node_config, dict):
            log.error("rank %d: unknown operation %r", rank, op)
            continue
        try:
            HANDLERS[op](channel.decode_content(header.get("content"), body), node_config)
        except Exception:  # rank 0 reports the message's error; this rank carries on
            log.exception("rank %d: %s failed", rank, op)
        else:
            log.info("rank %d: %s done", rank, op)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client_app.ranks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--fd", type=int, required=True, help="this rank's end of the socket pair to rank 0")
    ap.add_argument("--parent", type=int, required=True, help="rank 0's pid (the worker)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    _watch_parent(args.parent)
    link = socket.socket(fileno=args.fd)
    _init_group(Path(args.store), args.rank, args.world)
    log.info("rank %d of %d joined", args.rank, args.world)
    serve(link, args.rank)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
