"""The local channel between a node's `flwr-clientapp` process and its worker (client_app/worker.py).

A Unix socket that only the node's own user can open: it lives in a directory of mode 0700 that
this user owns (`$XDG_RUNTIME_DIR/spes-workers`, else `/tmp/spes-workers-<uid>`: a socket path
must fit in 108 bytes, which a node's work dir may not) and is named by a digest of the
node's work dir, so one worker serves one (run, partition). A frame is a JSON header and a body
of bytes; the body is a message's content in Flower's own protobuf serialization of a RecordDict
(what arrived over the network, checked the same way after), never pickle.

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
MAX_HEADER = 1 << 20
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


def identity(workdir: Path) -> dict[str, str]:
    """What a worker must match to serve a message: the node's work dir (run and partition), the code
    and the interpreter."""
    return {"workdir": str(workdir), "code": code_digest(), "python": sys.executable}


def send(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(MAGIC + struct.pack("<IQ", len(head), len(body)) + head)
    if body:
        sock.sendall(body)


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


def recv(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
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
    return header, bytes(_read_exactly(sock, body_len)) if body_len else b""


def encode_content(content) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def decode_content(data: bytes):
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    return recorddict_from_proto(ProtoRecordDict.FromString(data))
