"""Everything the coordinator writes about a run.

`RunLog.log_round` is the one path every round's metrics take: always to metrics.jsonl, and,
when enabled in config (`logging.*`), to TensorBoard event files and Weights & Biases, with
per-node metrics tagged by node (partition id).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# Per-node scalars sent to TensorBoard / W&B as node<i>/<name>.
NODE_SCALARS = ("train_loss", "tokens_per_s", "peak_mem_mb", "bytes_up", "bytes_down", "num_tokens", "train_seconds")
ROUND_SCALARS = ("val_loss", "train_loss", "tokens", "bytes_up", "bytes_down", "merge_alpha", "wall_s", "global_step")


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def flat_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Tagged scalars of one round: global ones by name, per-node ones as node<i>/<name>."""
    out = {k: float(record[k]) for k in ROUND_SCALARS if isinstance(record.get(k), (int, float))}
    for pid, node in record.get("nodes", {}).items():
        for k in NODE_SCALARS:
            if isinstance(node.get(k), (int, float)):
                out[f"node{pid}/{k}"] = float(node[k])
        for layer, fractions in enumerate(node.get("expert_load", [])):
            for e, f in enumerate(fractions):
                out[f"node{pid}/expert_load/layer{layer}/expert{e}"] = float(f)
    return out


class RunLog:
    def __init__(
        self, run_dir: Path, tensorboard: bool = False, wandb: bool = False, wandb_project: str = "spes-flower",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.rounds: list[dict[str, Any]] = []
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            import wandb as wandb_lib

            self._wandb = wandb_lib.init(project=wandb_project, name=run_dir.name, dir=str(run_dir), config=config)

    def log_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        step = int(record["round"])
        if self._tb is not None:
            for tag, value in flat_scalars(record).items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(flat_scalars(record), step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

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
