"""Combine the nodes' updates into the new global model (no Flower, no training)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from strategy.outer import OuterOptimizer


def trimmed_mean(copies: list[torch.Tensor], trim_fraction: float) -> torch.Tensor:
    """Per-entry mean after dropping the floor(trim_fraction * n) largest and smallest values."""
    k = math.floor(trim_fraction * len(copies))
    stacked = torch.stack([c.double() for c in copies])
    if k:
        stacked = stacked.sort(dim=0).values[k : len(copies) - k]
    return stacked.mean(dim=0)


def coordinate_median(copies: list[torch.Tensor]) -> torch.Tensor:
    """Per-entry median; with an even count, the mean of the two middle values."""
    ordered = torch.stack([c.double() for c in copies]).sort(dim=0).values
    n = len(copies)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def aggregate(
    params: Mapping[str, torch.Tensor],
    updates: Mapping[int, tuple[Mapping[str, torch.Tensor], float]],
    trainers: Callable[[str], set[int]],
    outer: OuterOptimizer,
    trim_fraction: float = 0.0,
    median: bool = False,
) -> dict[str, torch.Tensor]:
    """New global parameters.

    `updates[p] = (tensors, weight)`: node p's trained tensors and its weight (tokens trained,
    or 1 for a plain mean). Each parameter becomes the weighted mean of the copies of the nodes
    that trained it and sent a valid update, passed through the outer optimizer. An expert with
    a single owner is thus its owner's copy (with the default plain-average outer step). With
    `trim_fraction` > 0, parameters with three or more copies take the unweighted trimmed mean
    instead (robust to a few outlying nodes), and with `median` their coordinate-wise median (robust
    to any minority, at the price of a noisier average). A parameter nobody updated keeps its value.
    """
    new = dict(params)
    for name, old in params.items():
        contributors = [p for p in sorted(trainers(name)) if p in updates and name in updates[p][0]]
        if not contributors:
            continue
        if len(contributors) == 1:
            averaged = updates[contributors[0]][0][name]
        elif median and len(contributors) >= 3:
            averaged = coordinate_median([updates[p][0][name] for p in contributors]).to(old.dtype)
        elif trim_fraction > 0 and len(contributors) >= 3:
            averaged = trimmed_mean([updates[p][0][name] for p in contributors], trim_fraction).to(old.dtype)
        else:
            weights = torch.tensor([float(updates[p][1]) for p in contributors], dtype=torch.float64)
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                weights = torch.ones_like(weights)
            weights = weights / weights.sum()
            acc = torch.zeros_like(old, dtype=torch.float64)
            for w, p in zip(weights.tolist(), contributors):
                acc.add_(updates[p][0][name].double(), alpha=w)
            averaged = acc.to(old.dtype)
        new[name] = outer.step(name, old, averaged)
    return new
