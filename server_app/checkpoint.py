"""The coordinator's resumable state: global weights, outer-optimizer momentum, strategy state.

Written after every round to `<run dir>/checkpoint/round-<k>/` through a temporary directory
that is fsynced and renamed into place, so a crash at any moment leaves the previous round's
checkpoint whole; the newest two are kept. Weights are safetensors (bit-exact fp32), the rest
JSON. `resume=true` continues from the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("spes.server")
KEEP = 2
_ROUND_DIR = re.compile(r"^round-(\d{6})$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    root: Path, round_: int, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], state: dict[str, Any]
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp / "params.safetensors"))
    save_file({k: v.contiguous() for k, v in buffers.items()}, str(tmp / "outer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "round": round_}, indent=1, sort_keys=True))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    final = root / f"round-{round_:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in rounds(root)[:-KEEP]:
        shutil.rmtree(root / f"round-{old:06d}", ignore_errors=True)
    return final


def rounds(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _ROUND_DIR.match(p.name)))


def load_latest(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]] | None:
    """(params, outer buffers, state) of the newest readable checkpoint, or None."""
    for r in reversed(rounds(root)):
        d = root / f"round-{r:06d}"
        try:
            state = json.loads((d / "state.json").read_text())
            return load_file(str(d / "params.safetensors")), load_file(str(d / "outer.safetensors")), state
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("checkpoint %s unreadable (%s); trying an older one", d, exc)
    return None
