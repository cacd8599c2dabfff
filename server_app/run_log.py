"""Everything the coordinator writes about a run: metrics.jsonl, summary.json, loss.png."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


class RunLog:
    """One JSON object per round appended to metrics.jsonl (flushed, so a crash loses nothing)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.rounds: list[dict[str, Any]] = []

    def log_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def plot_loss(self, first_val_loss: float, tokens_per_round: list[float]) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tokens = [0.0]
        for t in tokens_per_round:
            tokens.append(tokens[-1] + t)
        val = [first_val_loss] + [r["val_loss"] for r in self.rounds]
        train = [r["train_loss"] for r in self.rounds]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(tokens, val, marker="o", label="held-out (global model)")
        ax.plot(tokens[1:], [t if math.isfinite(t) else None for t in train], marker=".", label="train (node mean)")
        ax.set_xlabel("tokens trained (all nodes)")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.run_dir / "loss.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
