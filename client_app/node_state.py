"""What a node keeps between rounds, in a node-local directory.

In deployment every Flower message runs in a fresh process and `context.state` is sent back
by an exit handler that silently drops large states, so weights and optimizer moments live
on the node's disk instead, keyed by the run's token and the node's partition id. Files
never leave the node; `torch.load(weights_only=True)` reads only our own tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def node_dir(root: str | Path, run_token: str, partition_id: int) -> Path:
    return Path(root).expanduser().resolve() / run_token / f"partition-{partition_id}"


def default_work_root() -> Path:
    return Path(os.environ.get("SPES_NODE_WORK_DIR", "~/.cache/spes-flower/nodes")).expanduser()


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class NodeState:
    """Trained tensors of the owned experts, AdamW state, schedule and data position."""

    global_step: int = 0
    owned: list[int] = field(default_factory=list)
    stream: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})
    owned_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None

    def save(self, directory: Path) -> None:
        """Write to a temp dir, then swap: a crash leaves the previous state intact."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in self.owned_tensors.items()}, str(tmp / "owned.safetensors"))
        if self.optimizer is not None:
            torch.save(self.optimizer, tmp / "optimizer.pt")
        meta = {"global_step": self.global_step, "owned": self.owned, "stream": self.stream}
        (tmp / "meta.json").write_text(json.dumps(meta))
        old = directory.with_name(f".{directory.name}.old{os.getpid()}")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> "NodeState | None":
        if not (directory / "meta.json").exists():
            return None
        meta = json.loads((directory / "meta.json").read_text())
        opt_path = directory / "optimizer.pt"
        return cls(
            global_step=int(meta["global_step"]),
            owned=[int(e) for e in meta["owned"]],
            stream=dict(meta["stream"]),
            owned_tensors=load_file(str(directory / "owned.safetensors")),
            optimizer=torch.load(opt_path, weights_only=True) if opt_path.exists() else None,
        )
