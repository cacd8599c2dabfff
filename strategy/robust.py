"""Bounds on how far one node can move the global model in a round (no Flower, no training).

An update is the change a node proposes, d_p = x_p - x (its trained tensor minus the global one).
Two clippings, both relative to what honest nodes did in the same round, so they need no absolute
threshold and no norm floor (a LoRA B matrix that starts at zero is bounded like any other tensor):

- **Centered clipping of shared tensors** (Karimireddy et al., ICML 2021, with the global tensor as
  the center): for a tensor trained by n >= 3 nodes, with m the median of their update norms,
  d_p <- d_p * min(1, c * m / ||d_p||). One node of n >= 3 cannot move the median, so its pull on
  the mean is at most c * m * w_p, the size of an honest update times its weight.
- **Peer clipping of expert tensors**: an expert is trained by its owner alone, so its peers are
  the other experts of the same layer and projection this round; with m their median update norm,
  the same rule with factor c_e. A node owning fewer than half of a layer's experts cannot move
  that median. (Bounding an expert by its own past updates instead lets a patient attacker grow
  the bound by c_e every few rounds; its peers' updates do not grow with it.)

A clipped update is still a full-size pull in a direction of the sender's choosing, and a sign-flipped
update is no larger than an honest one; `Clipping.suspects` names both for the guard's leave-one-out
test (strategy/guard.py). Coordinate-wise median (Yin et al., ICML 2018) and the trimmed mean are in
strategy/aggregation.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from model.naming import parse_expert_param

Updates = Mapping[int, tuple[Mapping[str, torch.Tensor], float]]


def _norm(update: torch.Tensor, old: torch.Tensor) -> float:
    return float((update.double() - old.double()).norm())


def _scaled(update: torch.Tensor, old: torch.Tensor, scale: float) -> torch.Tensor:
    """old + scale * (update - old), in the update's dtype."""
    return (old.double() + scale * (update.double() - old.double())).to(update.dtype)


def reference_norms(
    params: Mapping[str, torch.Tensor], updates: Updates, trainers: Callable[[str], set[int]]
) -> dict[tuple[int, str], tuple[str, float]]:
    """(partition, tensor name) -> ("shared" or "expert", the median update norm it is measured against).

    Only tensors with a reference: those 3+ nodes train (shared ones; experts too where every node
    trains every expert: then against the expert's other holders), and single-owner experts with 3+
    peers in their layer."""
    refs: dict[tuple[int, str], tuple[str, float]] = {}
    peers: dict[tuple[int, str], list[tuple[int, str, float]]] = {}
    for name, old in params.items():
        holders = [p for p in sorted(trainers(name)) if p in updates and name in updates[p][0]]
        norms = [_norm(updates[p][0][name], old) for p in holders]
        if len(holders) >= 3:  # shared tensors, and experts every node trains (DiLoCo, FedAvg)
            kind = "shared" if parse_expert_param(name) is None else "expert"
            median = statistics.median(norms)
            refs.update({(p, name): (kind, median) for p in holders})
        elif len(holders) == 1 and (e := parse_expert_param(name)) is not None:
            peers.setdefault((e.layer, e.proj), []).append((holders[0], name, norms[0]))
    for group in peers.values():
        if len(group) >= 3:
            median = statistics.median(n for _, _, n in group)
            refs.update({(p, name): ("expert", median) for p, name, _ in group})
    return refs


@dataclass
class Clipping:
    updates: dict[int, tuple[dict[str, torch.Tensor], float]]  # as clipped
    clipped: dict[int, int] = field(default_factory=dict)  # partition -> tensors clipped
    # partition -> {"shared"/"expert": its largest update norm / median norm}: how close it came to the bound
    scale: dict[int, dict[str, float]] = field(default_factory=dict)
    cosine: dict[int, float] = field(default_factory=dict)  # partition -> see `agreement`

    @property
    def suspects(self) -> list[int]:
        """Clipped, or pulling against the others: the guard tests whether the model is better without them."""
        return sorted(set(self.clipped) | {p for p, c in self.cosine.items() if c < 0})


def agreement(
    params: Mapping[str, torch.Tensor], updates: Updates, trainers: Callable[[str], set[int]]
) -> dict[int, float]:
    """partition -> cosine between its update of the shared tensors (those 3+ nodes train) and the sum of
    the other nodes' updates of them. Honest nodes descend the same loss and agree (> 0); an update
    that points against the rest (a sign flip) does not, whatever its norm."""
    dot: dict[int, float] = {}
    own: dict[int, float] = {}
    others: dict[int, float] = {}
    for name, old in params.items():
        holders = [p for p in sorted(trainers(name)) if p in updates and name in updates[p][0]]
        if len(holders) < 3:
            continue
        deltas = {p: updates[p][0][name].double() - old.double() for p in holders}
        total = sum(deltas.values())
        for p, d in deltas.items():
            rest = total - d
            dot[p] = dot.get(p, 0.0) + float((d * rest).sum())
            own[p] = own.get(p, 0.0) + float((d * d).sum())
            others[p] = others.get(p, 0.0) + float((rest * rest).sum())
    return {p: dot[p] / math.sqrt(own[p] * others[p]) if own[p] and others[p] else 1.0 for p in dot}


def clip_updates(
    params: Mapping[str, torch.Tensor],
    updates: Updates,
    trainers: Callable[[str], set[int]],
    shared_factor: float,
    expert_factor: float,
) -> Clipping:
    """Every update norm beyond factor x its median pulled back to that bound (a factor of 0: not clipped)."""
    factors = {"shared": shared_factor, "expert": expert_factor}
    refs = reference_norms(params, updates, trainers)
    out = Clipping({}, cosine=agreement(params, updates, trainers))
    for p, (tensors, weight) in updates.items():
        new = dict(tensors)
        for name, t in tensors.items():
            if (p, name) not in refs:
                continue
            kind, median = refs[(p, name)]
            norm = _norm(t, params[name])
            ratio = norm / median if median > 0 else (math.inf if norm > 0 else 1.0)
            scale = out.scale.setdefault(p, {})
            scale[kind] = max(scale.get(kind, 0.0), ratio)
            if factors[kind] and ratio > factors[kind]:
                new[name] = _scaled(t, params[name], factors[kind] * median / norm)
                out.clipped[p] = out.clipped.get(p, 0) + 1
        out.updates[p] = (new, weight)
    return out
