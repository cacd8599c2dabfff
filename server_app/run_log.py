"""Everything the coordinator writes about a run.

`RunLog.log_round` is the one path every round's metrics take: always to metrics.jsonl, and,
when enabled in config (`logging.*`), to TensorBoard event files and Weights & Biases, with
per-node metrics tagged by node (partition id), plus the run-level scalars the report plots
(cumulative bytes, seconds per round, expert load over all nodes) and lm-eval results.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from server_app.report import expert_load_by_round
from strategy.round_record import RoundRecord

# Per-node scalars sent to TensorBoard / W&B as node<i>/<name>.
NODE_SCALARS = (
    "train_loss",
    "tokens_per_s",
    "peak_mem_mb",
    "bytes_up",
    "bytes_down",
    "num_tokens",
    "train_seconds",
    "round_seconds",
)
ROUND_SCALARS = ("val_loss", "train_loss", "tokens", "bytes_up", "bytes_down", "merge_alpha", "wall_s", "global_step")


def flat_scalars(record: RoundRecord) -> dict[str, float]:
    """Tagged scalars of one round: global ones by name, per-node ones as node<i>/<name>."""
    out = {k: float(v) for k in ROUND_SCALARS if isinstance(v := getattr(record, k), (int, float))}
    for pid, node in record.nodes.items():
        for k in NODE_SCALARS:
            if isinstance(node.get(k), (int, float)):
                out[f"node{pid}/{k}"] = float(node[k])
        for layer, fractions in enumerate(node.get("expert_load", [])):
            for e, f in enumerate(fractions):
                out[f"node{pid}/expert_load/layer{layer}/expert{e}"] = float(f)
    return out


def eval_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {
        f"eval/{task}/{metric}": float(v)
        for task, metrics in results.items()
        for metric, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def run_scalars(rounds: list[RoundRecord]) -> dict[str, float]:
    """The last round's scalars as the run report plots them (needs the rounds so far).

    Cumulative bytes (all nodes and per node, as in traffic.png), seconds the round took, and the
    expert load over all nodes (as in expert_load.png: token share x number of experts).
    """
    if not rounds:
        return {}
    last = rounds[-1]
    out = {
        "total/bytes_up": float(sum(r.bytes_up for r in rounds)),
        "total/bytes_down": float(sum(r.bytes_down for r in rounds)),
    }
    for pid in last.nodes:
        out[f"node{pid}/bytes_total"] = float(
            sum(r.nodes.get(pid, {}).get("bytes_up", 0) + r.nodes.get(pid, {}).get("bytes_down", 0) for r in rounds)
        )
    if len(rounds) > 1 and last.wall_s is not None and rounds[-2].wall_s is not None:
        out["round_s"] = float(last.wall_s - rounds[-2].wall_s)
    grid = expert_load_by_round([last])
    if grid is not None:
        experts = len(grid[0])
        for layer, rows in enumerate(grid):
            for e, (share,) in enumerate(rows):
                if math.isfinite(share):
                    out[f"expert_load/layer{layer}/expert{e}"] = share * experts
    return out


def finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """The round's record with every non-finite number replaced by None and its path listed under
    "non_finite", so metrics.jsonl stays strict JSON that any reader parses."""
    refused: list[str] = []

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            refused.append(path)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if refused:
        out["non_finite"] = sorted(refused)
    return out


def _line(record: RoundRecord) -> str:
    return json.dumps(finite_record(record.to_dict()), sort_keys=True, allow_nan=False) + "\n"


def wandb_mode(env: dict[str, str] | None = None, netrc: Path | None = None) -> str:
    """WANDB_MODE when set; else online only with credentials (WANDB_API_KEY or a wandb entry in
    ~/.netrc), offline otherwise, so that a run without a login records locally instead of waiting
    for one (`wandb sync <run dir>/wandb/offline-run-*` uploads it later)."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    netrc = Path("~/.netrc").expanduser() if netrc is None else netrc
    logged_in = bool(env.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return "online" if logged_in else "offline"


class RunLog:
    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "spes-flower",
        config: dict[str, Any] | None = None,
        keep_rounds_upto: int | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.config = config
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[RoundRecord] = []
        if keep_rounds_upto is not None and self.path.exists():
            # A resumed run keeps what it logged up to its checkpoint and drops any later round.
            for line in self.path.read_text().splitlines():
                if line.strip() and (rec := RoundRecord.from_dict(json.loads(line))).round <= keep_rounds_upto:
                    self.rounds.append(rec)
        self.path.write_text("".join(_line(r) for r in self.rounds))
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            import wandb as wandb_lib

            self._wandb = wandb_lib.init(
                project=wandb_project, name=run_dir.name, dir=str(run_dir), config=config, mode=wandb_mode()
            )

    def log_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        with self.path.open("a") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())
        step = record.round
        if self._tb is None and self._wandb is None:
            return
        scalars = {**flat_scalars(record), **run_scalars(self.rounds)}
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

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
        val = [first_val_loss] + [r.val_loss for r in self.rounds]
        train = [r.train_loss for r in self.rounds]
        fig, ax = plt.subplots(figsize=(6, 4))
        middle = [(a + b) / 2 for a, b in zip(tokens, tokens[1:])]  # a round's train loss is its mean
        ax.plot(tokens, val, marker="o", label="held-out cross-entropy (global model, after the round)")
        ax.plot(
            middle,
            [t if math.isfinite(t) else None for t in train],
            marker=".",
            linestyle="--",
            label="train loss (node mean over the round: cross-entropy + balancing + z-losses)",
        )
        ax.set_xlabel("tokens trained (all nodes)")
        ax.set_ylabel("loss (nats per token)")
        model = (self.config or {}).get("model", {}).get("name")
        ax.set_title(f"{self.run_dir.name}" + (f" (model {model})" if model else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = self.run_dir / "loss.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def tensorboard_eval(run_dir: Path, results: dict[str, dict[str, Any]], step: int) -> bool:
    """Add lm-eval results (task -> metric -> value) as eval/<task>/<metric> at `step` (the round
    of the checkpoint) to the run's TensorBoard events, if the run wrote any; True if it did."""
    tb_dir = Path(run_dir) / "tensorboard"
    if not tb_dir.is_dir():
        return False
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tb_dir)) as writer:
        for tag, value in eval_scalars(results).items():
            writer.add_scalar(tag, value, step)
    return True
