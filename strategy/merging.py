"""Expert-merging warm-up (spes-method.md section 3).

At a merge step, within each MoE layer, expert i moves a fraction alpha towards the mean of
its top-k most similar experts (cosine similarity of the flattened gate projections). Every
update is computed from the pre-merge snapshot, and parameters are paired by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.naming import group_expert_params


@dataclass
class MergeSchedule:
    enabled: bool = True
    alpha_start: float = 0.01
    decay_steps: int = 10000
    interval: int = 500
    top_k: int = 4

    def validate(self, num_experts: int) -> None:
        if not self.enabled:
            return
        if not 1 <= self.top_k < num_experts:
            raise ValueError(
                f"strategy.merge.top_k must be in [1, num_experts) = [1, {num_experts}), got {self.top_k}"
            )
        if self.interval < 1 or self.decay_steps < 1:
            raise ValueError("strategy.merge.interval and strategy.merge.decay_steps must be >= 1")
        if not 0.0 <= self.alpha_start <= 1.0:
            raise ValueError(f"strategy.merge.alpha_start must be in [0, 1], got {self.alpha_start}")

    def alpha(self, step: int) -> float:
        """Linear decay from alpha_start to 0 over decay_steps."""
        return self.alpha_start * (1.0 - min(step / self.decay_steps, 1.0))

    def due(self, prev_step: int, step: int) -> bool:
        """Merge when this sync crossed a multiple of `interval` (H need not divide it)."""
        if not self.enabled or self.alpha(step) <= 0.0:
            return False
        return step // self.interval > prev_step // self.interval


def merge_experts(params: dict[str, torch.Tensor], alpha: float, top_k: int) -> dict[str, torch.Tensor]:
    """New values for every expert parameter of `params` (shared ones are not returned)."""
    merged: dict[str, torch.Tensor] = {}
    for layer, experts in group_expert_params(params).items():
        ids = sorted(experts)
        if top_k >= len(ids):
            raise ValueError(f"merge top_k={top_k} must be < number of experts ({len(ids)}) in layer {layer}")
        gates = torch.stack([params[experts[e]["gate_proj"]].flatten().float() for e in ids])
        sim = F.normalize(gates, dim=1) @ F.normalize(gates, dim=1).T
        sim.fill_diagonal_(float("-inf"))
        neighbours = sim.topk(top_k, dim=1).indices  # [E, k], positions in `ids`
        for row, e in enumerate(ids):
            js = [ids[j] for j in neighbours[row].tolist()]
            for proj, name in experts[e].items():
                theta_i = params[name]
                mean_diff = torch.stack([params[experts[j][proj]] - theta_i for j in js]).mean(0)
                merged[name] = theta_i + alpha * mean_diff
    return merged
