"""Measured expert ownership (`strategy.assignment_policy`): every `assignment_every` rounds the
coordinator looks at what the nodes reported over that many rounds and moves experts.

- `load`: per-expert routed load (token-weighted mean of the nodes' `expert-load` reports, summed
  over layers) is evened out across nodes by swaps, so experts per node stay as they are.
- `speed`: experts per node proportional to the nodes' measured tokens/s.

Only reports of accepted replies count, and no one node decides: the load is the per-round median
of the nodes' reports (strategy/federation_load.robust_load), a node's speed is the median of its
rates over the window, clipped to within SPEED_CLIP x the median node's; and one decision moves at
most one expert per node (`speed`) or makes one swap (`load`). The round log is not part of a checkpoint, so after a
resume the window holds the rounds since the resume only.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from common.spec import StrategyConfig
from strategy.assignment import Ownership, balance_by_load, balance_by_speed
from strategy.federation_load import robust_load

log = logging.getLogger("spes.strategy")

SPEED_CLIP = 4.0  # a node counts as at most this many times faster (or slower) than the median node
MAX_CHANGE = 1  # experts a node may gain or lose per decision (speed); swaps per decision (load)


def mean_expert_load(rounds: Sequence[Mapping[Any, Mapping[str, Any]]], num_experts: int) -> list[float] | None:
    """One load per expert: each round's federation load (robust_load over the accepted reports), then
    the mean over the rounds that had one, summed over layers.

    `rounds` holds one {partition: node record} per round (the round log's `nodes`); None when
    no accepted reply reported a load."""
    per_round = [
        robust_load(
            [
                (node.get("expert_load"), float(node.get("num_tokens", 0.0)))
                for node in nodes.values()
                if node.get("status") == "ok"
            ]
        )
        for nodes in rounds
    ]
    per_round = [load for load in per_round if load is not None]
    if not per_round:
        return None
    return [
        sum(load[layer][e] for load in per_round for layer in range(len(load))) / len(per_round)
        for e in range(num_experts)
    ]


def mean_speed(rounds: Sequence[Mapping[Any, Mapping[str, Any]]], partitions: Sequence[int]) -> dict[int, float]:
    """Tokens/s of each partition over `rounds`: the median of its accepted per-round rates, clipped to
    [median / SPEED_CLIP, median x SPEED_CLIP] of the partitions' medians; partitions without an
    accepted measurement are left out."""
    rates: dict[int, list[float]] = {p: [] for p in partitions}
    for nodes in rounds:
        for key, node in nodes.items():
            p, rate, n = int(key), float(node.get("tokens_per_s", 0.0)), float(node.get("num_tokens", 0.0))
            if p in rates and node.get("status") == "ok" and rate > 0 and n > 0:
                rates[p].append(rate)
    own = {p: statistics.median(r) for p, r in rates.items() if r}
    if not own:
        return {}
    middle = statistics.median(own.values())
    return {p: min(max(r, middle / SPEED_CLIP), middle * SPEED_CLIP) for p, r in own.items()}


def _spread(owners: Mapping[int, Sequence[int]], load: Sequence[float]) -> float:
    sums = [sum(load[e] for e in experts) for experts in owners.values()]
    return max(sums) - min(sums)


def propose_owners(
    cfg: StrategyConfig,
    round_: int,
    window: Sequence[Mapping[Any, Mapping[str, Any]]],
    active: Mapping[int, tuple[int, ...]],
    num_experts: int,
) -> tuple[dict[int, tuple[int, ...]], str, dict[str, Any]] | None:
    """New owners of the `active` partitions by `cfg.assignment_policy`, the reason and what was
    measured, at a reconsideration round (every `assignment_every`); None when nothing is due or
    nothing was measured. `window`: the nodes' records of the last rounds, this one last."""
    if cfg.assignment_policy == "static" or cfg.assignment == "replicated" or round_ % cfg.assignment_every:
        return None
    every = cfg.assignment_every
    if cfg.assignment_policy == "load":
        load = mean_expert_load(window, num_experts)
        if load is None:
            log.info("round %d: no expert-load reports in the last %d rounds; ownership kept", round_, every)
            return None
        new = balance_by_load(active, load, cfg.assignment_tolerance, max_swaps=MAX_CHANGE)
        before, after = _spread(active, load), _spread(new, load)
        extra: dict[str, Any] = {"load_spread": [round(before, 6), round(after, 6)]}
        reason = f"load-aware: per-node routed load spread {before:.4f} -> {after:.4f} over the last {every} round(s)"
    else:
        speed = mean_speed(window, list(active))
        if set(speed) != set(active):
            log.info(
                "round %d: no tokens/s of partition(s) %s in the last %d rounds; ownership kept",
                round_,
                sorted(set(active) - set(speed)),
                every,
            )
            return None
        new = balance_by_speed(active, speed, max_change=MAX_CHANGE)
        extra = {"tokens_per_s": {str(p): round(s, 3) for p, s in speed.items()}}
        reason = (
            f"load-aware: experts per node {[len(active[p]) for p in sorted(active)]} -> "
            f"{[len(new[p]) for p in sorted(new)]} for tokens/s {[round(speed[p], 1) for p in sorted(speed)]}"
        )
    Ownership(num_experts, tuple(new[p] for p in sorted(new))).validate()
    return new, reason, extra
