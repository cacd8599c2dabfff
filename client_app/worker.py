"""A node's resident worker: one process per (run, partition) that outlives Flower's per-message process.

Flower 1.42 runs every deployment message in a fresh `flwr-clientapp` process, which would import
torch and transformers and rebuild the node from disk each round. The first message of a run
starts this worker (client_app/worker_link.py); later messages hand their content to it over the
local channel (client_app/worker_channel.py) and it runs the same handlers
(client_app/handlers.py) in a process that keeps the imports, the model, the optimizer and the
device memory (client_app/resident.py) from one round to the next.

Lifecycle: a lock in the node's work dir, so two cannot serve one node; it exits when the
SuperNode that started it is gone, after `--idle-exit` seconds without a message, on SIGTERM or
SIGINT (it shares the SuperNode's process group, so stopping the SuperNode's group stops it),
or when asked to by a message of other code. A state being saved in the background is
finished before it exits. Every message it served is a line in `<work dir>/worker-served.jsonl`.

With `--gpus n` (node-config gpus) it is rank 0 of the node's n ranks and starts the others
(client_app/ranks.py) before it listens; each message goes to all of them.

    python -m client_app.worker --workdir <node work dir> [--parent <pid>] [--idle-exit 1800] [--gpus 1]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from client_app import worker_channel as channel
from client_app.background_save import process_alive, process_start_time
from common.atomic import write_text_atomic

log = logging.getLogger("spes.worker")
POLL_S = 1.0


class Worker:
    def __init__(self, workdir: Path, parent: int | None, idle_exit_s: float, gpus: int = 1) -> None:
        self.workdir, self.gpus = workdir, gpus
        self.ranks = None  # client_app.ranks.RankGroup where gpus > 1
        self.parent = parent
        self.parent_start = None if parent is None else process_start_time(parent)  # a reused PID is not it
        self.idle_exit_s = idle_exit_s
        self.identity = channel.identity(workdir, gpus)
        self.busy = threading.Lock()
        self.stop = threading.Event()
        self.last_active = time.monotonic()

    def serve(self) -> int:
        """Serve until told to stop; 0, or channel.ANOTHER_SERVES where another worker already serves this node."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        lock = open(self.workdir / "worker.lock", "w")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another worker serves %s", self.workdir)
            return channel.ANOTHER_SERVES
        import client_app.handlers  # noqa: F401 - torch, transformers: paid once, before it listens

        if self.gpus > 1:
            from client_app.ranks import RankGroup

            self.ranks = RankGroup(self.workdir, self.gpus).start()
        path = channel.socket_path(self.workdir)
        path.unlink(missing_ok=True)  # we hold the lock: a socket file left there is a dead worker's
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        os.chmod(path, 0o600)
        server.listen(8)
        server.settimeout(POLL_S)
        record = {"pid": os.getpid(), "socket": str(path), **self.identity}
        write_text_atomic(self.workdir / "worker.json", json.dumps(record) + "\n")
        log.info("worker %d serves %s on %s", os.getpid(), self.workdir, path)
        try:
            while not self._should_exit():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._connection, args=(conn,), daemon=True).start()
        finally:
            server.close()
            path.unlink(missing_ok=True)
            if self.ranks is not None:
                self.ranks.stop()
        return 0

    def _should_exit(self) -> bool:
        if self.stop.is_set():
            return True
        if self.parent is not None and not process_alive(self.parent, self.parent_start):
            log.info("the SuperNode (pid %d) is gone: exiting", self.parent)
            return True
        idle = time.monotonic() - self.last_active
        if not self.busy.locked() and idle > self.idle_exit_s:
            log.info("no message for %.0f s: exiting", idle)
            return True
        return False

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            try:
                header, body = channel.recv(conn)
            except (ConnectionError, ValueError) as exc:
                log.warning("dropped a connection: %s", exc)
                return
            op = header.get("op")
            if op == "hello":
                channel.send(conn, {"ok": True, "pid": os.getpid(), "identity": self.identity})
            elif op == "stop":
                channel.send(conn, {"ok": True})
                self.stop.set()
            elif header.get("identity") != self.identity:
                channel.send(conn, {"ok": False, "stale": True, "identity": self.identity})
            else:
                self._message(conn, str(op), header, body)

    def _message(self, conn: socket.socket, op: str, header: dict, body: bytearray) -> None:
        from client_app.handlers import HANDLERS

        node_config = header.get("node_config")
        if op not in HANDLERS or not isinstance(node_config, dict):
            channel.send(conn, {"ok": False, "error": f"unknown operation {op!r} or no node config"})
            return
        received_at = time.time()
        with self.busy:
            self.last_active = time.monotonic()
            started = time.perf_counter()
            try:
                if self.ranks is not None:
                    self.ranks.forward({"op": op, "node_config": node_config, "content": header.get("content")}, body)
                reply = HANDLERS[op](channel.decode_content(header.get("content"), body), node_config)
            except Exception as exc:  # the message's error, reported as the in-process node would raise it
                log.exception("%s failed", op)
                channel.send(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                if self.ranks is not None:  # the ranks may be out of step: the next message starts afresh
                    log.info("stopping with the node's ranks after a failed message")
                    self.stop.set()
                return
            finally:
                self.last_active = time.monotonic()
            handler_s = time.perf_counter() - started
            layout, parts = channel.encode_content(reply)
            channel.send(conn, {"ok": True, "content": layout}, parts)
            timing = header.get("timing") if isinstance(header.get("timing"), dict) else {}
            self._record(op, reply, {**timing, "received_at": received_at, "handler_s": handler_s})

    def _record(self, op: str, reply, timing: dict) -> None:
        metrics = dict(reply.metric_records["metrics"]) if "metrics" in reply.metric_records else {}
        line = {"pid": os.getpid(), "op": op, "time": time.time(), "resident": metrics.get("resident")}
        line["timing"] = {k: v for k, v in timing.items() if isinstance(v, (int, float))}
        with open(self.workdir / "worker-served.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client_app.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workdir", required=True, help="the node's work dir for this run (<work-dir>/<run>/partition-<i>)"
    )
    ap.add_argument("--parent", type=int, default=None, help="exit when this process (the SuperNode) is gone")
    ap.add_argument("--idle-exit", type=float, default=1800.0, help="exit after this many seconds without a message")
    ap.add_argument("--gpus", type=int, default=1, help="ranks of this node, one per GPU (node-config gpus)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    worker = Worker(Path(args.workdir).resolve(), args.parent, args.idle_exit, args.gpus)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop.set())
    code = worker.serve()
    from client_app.background_save import drain

    drain()  # a state still being written is finished before the process ends
    return code


if __name__ == "__main__":
    raise SystemExit(main())
