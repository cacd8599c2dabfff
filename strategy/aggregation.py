"""Combine the nodes' updates into the new global model (no Flower, no training)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from strategy.outer import OuterOptimizer


def aggregate(
    params: Mapping[str, torch.Tensor],
    updates: Mapping[int, tuple[Mapping[str, torch.Tensor], float]],
    trainers: Callable[[str], set[int]],
    outer: OuterOptimizer,
) -> dict[str, torch.Tensor]:
    """New global parameters.

    `updates[p] = (tensors, weight)`: node p's trained tensors and its weight (tokens trained).
    Each parameter becomes the weighted mean of the copies of the nodes that trained it and
    sent a valid update, passed through the outer optimizer. An expert with a single owner is
    thus its owner's copy (with the default plain-average outer step); shared parameters are
    the token-weighted mean. A parameter nobody updated keeps its value.
    """
    new = dict(params)
    for name, old in params.items():
        contributors = [p for p in sorted(trainers(name)) if p in updates and name in updates[p][0]]
        if not contributors:
            continue
        weights = torch.tensor([float(updates[p][1]) for p in contributors], dtype=torch.float64)
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        weights = weights / weights.sum()
        if len(contributors) == 1:
            averaged = updates[contributors[0]][0][name]
        else:
            acc = torch.zeros_like(old, dtype=torch.float64)
            for w, p in zip(weights.tolist(), contributors):
                acc.add_(updates[p][0][name].double(), alpha=w)
            averaged = acc.to(old.dtype)
        new[name] = outer.step(name, old, averaged)
    return new
