"""Expert-merging warm-up (docs/method.md section 3).

At a merge step, within each MoE layer, expert i moves a fraction alpha towards the mean of
its top-k most similar experts (cosine similarity of the flattened gate projections). Every
update is computed from the pre-merge snapshot, and parameters are paired by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.naming import group_expert_params


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
