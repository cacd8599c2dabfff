"""The local channel between a node's `flwr-clientapp` process and its worker (client_app/worker.py).

A Unix socket that only the node's own user can open: it lives in a directory of mode 0700 that
this user owns (`$XDG_RUNTIME_DIR/spes-workers`, else `/tmp/spes-workers-<uid>`: a socket path
must fit in 108 bytes, which a node's work dir may not) and is named by a digest of the
node's work dir, so one worker serves one (run, partition). A frame is a JSON header and a body
of bytes. A message's content travels as its arrays' bytes exactly as they arrived (Flower's
`Array.data`, decoded and checked by the handler as in-process), described in the header, and
its config and metric records in Flower's own protobuf serialization; never pickle. Not the
whole RecordDict as one protobuf: protobuf refuses messages over 2 GiB, and a 1b model is 4.7 GB
in fp32.

Light on purpose: the `flwr-clientapp` process of every message imports this, and the point of
the worker is that such a process need not import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

MAGIC = b"SPW1"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its terminating NUL
SOCKET_NAME_LEN = len("0" * 24 + ".sock")
MAX_HEADER = 1 << 24
ANOTHER_SERVES = 75  # a worker's exit status where another worker holds the node's lock (EX_TEMPFAIL)
# The node's code: a worker started from other code (an updated app) is never used.
NODE_PACKAGES = ("client_app", "common", "data", "model", "training")


class WorkerUnavailable(RuntimeError):
    """No usable worker for this message (none, stale, wedged or gone mid-message)."""


def channel_dir() -> Path:
    """The sockets' directory, created 0700; refused unless this user owns it and nobody else can enter.
    `$XDG_RUNTIME_DIR/spes-workers` where a socket path there fits in 108 bytes, else under /tmp."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "spes-workers" if base else None
    if path is None or len(str(path)) + 1 + SOCKET_NAME_LEN > MAX_SOCKET_PATH:
        path = Path("/tmp") / f"spes-workers-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WorkerUnavailable(f"{path} is not a directory of this user's with mode 0700: no worker socket there")
    return path


def socket_path(workdir: Path) -> Path:
    return channel_dir() / f"{hashlib.sha256(str(workdir).encode()).hexdigest()[:24]}.sock"


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the node's Python files (names and contents)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in NODE_PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def identity(workdir: Path, gpus: int = 1) -> dict[str, str]:
    """What a worker must match to serve a message: the node's work dir (run and partition), the code,
    the interpreter and its number of ranks (node-config gpus)."""
    return {"workdir": str(workdir), "code": code_digest(), "python": sys.executable, "gpus": str(gpus)}


def send(sock: socket.socket, header: dict[str, Any], parts: list[bytes] | tuple[bytes, ...] = ()) -> None:
    """One frame: the header, then the parts back to back as the body (not joined: no copy)."""
    head = json.dumps(header).encode()
    sock.sendall(MAGIC + struct.pack("<IQ", len(head), sum(len(p) for p in parts)) + head)
    for part in parts:
        sock.sendall(part)


def _read_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 24))
        if k == 0:
            raise ConnectionError(f"channel closed after {got} of {n} bytes")
        got += k
    return buf


def recv(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    """One frame; raises ConnectionError on a closed channel and ValueError on anything malformed."""
    prefix = _read_exactly(sock, 16)
    if bytes(prefix[:4]) != MAGIC:
        raise ValueError("not a worker-channel frame")
    head_len, body_len = struct.unpack("<IQ", bytes(prefix[4:]))
    if head_len > MAX_HEADER:
        raise ValueError(f"frame header of {head_len} bytes (at most {MAX_HEADER})")
    header = json.loads(bytes(_read_exactly(sock, head_len)))
    if not isinstance(header, dict):
        raise ValueError("frame header is not a JSON object")
    return header, _read_exactly(sock, body_len) if body_len else bytearray()


def encode_content(content) -> tuple[dict[str, Any], list[bytes]]:
    """(layout for the header, body parts) of a RecordDict: its config and metric records as one
    protobuf part, then every array's bytes."""
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_to_proto

    rest = RecordDict({k: v for k, v in content.items() if k not in content.array_records})
    parts = [recorddict_to_proto(rest).SerializeToString()]
    arrays: dict[str, list[dict[str, Any]]] = {}
    for name, record in content.array_records.items():
        arrays[name] = []
        for key, a in record.items():
            arrays[name].append({"key": key, "dtype": a.dtype, "shape": list(a.shape), "stype": a.stype})
            arrays[name][-1]["bytes"] = len(a.data)
            parts.append(a.data)
    return {"records_bytes": len(parts[0]), "arrays": arrays}, parts


def decode_content(layout: Any, body: bytearray):
    """The RecordDict that `encode_content` described; ValueError where layout and body disagree."""
    from flwr.app import Array, ArrayRecord
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    try:
        view, offset = memoryview(body), int(layout["records_bytes"])
        content = recorddict_from_proto(ProtoRecordDict.FromString(view[:offset].tobytes()))
        for name, entries in layout["arrays"].items():
            record = {}
            for e in entries:
                size = int(e["bytes"])
                data = view[offset : offset + size].tobytes()
                offset += size
                record[str(e["key"])] = Array(dtype=e["dtype"], shape=tuple(e["shape"]), stype=e["stype"], data=data)
            content[str(name)] = ArrayRecord(array_dict=record)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed content layout: {exc!r}") from exc
    if offset != len(body):
        raise ValueError(f"content layout covers {offset} bytes of a {len(body)}-byte body")
    return content
