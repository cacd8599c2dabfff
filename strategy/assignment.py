"""Expert ownership: which node trains which experts.

Ownership is its own small object so that later work (nodes joining or leaving, experts
reassigned) can replace the policy without touching aggregation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Ownership:
    """owners[p] = sorted expert indices trained by node p (p = rank of its partition id)."""

    num_experts: int
    owners: tuple[tuple[int, ...], ...]

    @property
    def num_nodes(self) -> int:
        return len(self.owners)

    def experts_of(self, node: int) -> tuple[int, ...]:
        return self.owners[node]

    def trainers_of(self, expert: int) -> tuple[int, ...]:
        return tuple(p for p, experts in enumerate(self.owners) if expert in experts)

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "owners": [list(o) for o in self.owners]}

    @classmethod
    def from_dict(cls, d: dict) -> Ownership:
        own = cls(int(d["num_experts"]), tuple(tuple(int(e) for e in o) for o in d["owners"]))
        own.validate(exclusive=False)  # a saved assignment may be SPES's (one owner each) or a baseline's (all)
        return own

    def check_range(self) -> None:
        """Every expert named exists in the model (some may have no owner yet)."""
        for p, experts in enumerate(self.owners):
            bad = [e for e in experts if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(f"node {p} owns experts {bad} outside [0, {self.num_experts})")

    def validate(self, exclusive: bool = True) -> None:
        """Every expert is trained by someone; with `exclusive`, by exactly one node."""
        self.check_range()
        for e in range(self.num_experts):
            n = len(self.trainers_of(e))
            if n == 0:
                raise ValueError(f"expert {e} has no owner")
            if exclusive and n > 1:
                raise ValueError(f"expert {e} has {n} owners; SPES needs exactly one")


def contiguous_assignment(num_experts: int, num_nodes: int) -> Ownership:
    """Node p owns a contiguous block of experts, as in the reference code.

    With E = m*N the blocks are [p*m, (p+1)*m). Uneven splits are allowed: the first E mod N
    nodes own one expert more than the rest (e.g. E=10, N=4 -> 3, 3, 2, 2).
    """
    if num_nodes < 1:
        raise ValueError(f"need at least one node, got {num_nodes}")
    if num_experts < num_nodes:
        raise ValueError(
            f"SPES needs at least as many experts per layer as nodes (E >= N), got E={num_experts}, N={num_nodes}"
        )
    base, extra = divmod(num_experts, num_nodes)
    owners, start = [], 0
    for p in range(num_nodes):
        size = base + (1 if p < extra else 0)
        owners.append(tuple(range(start, start + size)))
        start += size
    own = Ownership(num_experts, tuple(owners))
    own.validate()
    return own


def replicated_assignment(num_experts: int, num_nodes: int) -> Ownership:
    """Every node trains every expert (DiLoCo / FedAvg baselines)."""
    if num_nodes < 1:
        raise ValueError(f"need at least one node, got {num_nodes}")
    return Ownership(num_experts, tuple(tuple(range(num_experts)) for _ in range(num_nodes)))


def make_assignment(kind: str, num_experts: int, num_nodes: int) -> Ownership:
    kinds = {"contiguous": contiguous_assignment, "replicated": replicated_assignment}
    if kind not in kinds:
        raise ValueError(f"unknown expert assignment {kind!r}; choose one of {sorted(kinds)}")
    return kinds[kind](num_experts, num_nodes)


def rank_partitions(partition_ids: Sequence[int]) -> list[int]:
    """Node index of each partition id (sorted order), checking they are distinct."""
    if len(set(partition_ids)) != len(partition_ids):
        raise ValueError(f"partition ids must be distinct, got {sorted(partition_ids)}")
    order = sorted(partition_ids)
    return [order.index(pid) for pid in partition_ids]


def rebalance(
    owners: Mapping[int, Sequence[int]], active: Sequence[int], num_experts: int, kind: str = "contiguous"
) -> dict[int, tuple[int, ...]]:
    """Ownership over the `active` partitions after nodes left or joined, moving as few experts as possible.

    Active nodes keep what they own; experts of departed nodes go to the active nodes owning
    fewest (lowest partition id first); then experts move from the most to the least loaded
    until counts differ by at most one, so a newcomer gets a share. Exactly one owner per
    expert at all times (`replicated`: every active node trains every expert).
    """
    active = sorted(set(active))
    if not active:
        raise ValueError("no active node to own the experts")
    if kind == "replicated":
        return {p: tuple(range(num_experts)) for p in active}
    new = {p: sorted(e for e in owners.get(p, ()) if 0 <= e < num_experts) for p in active}
    taken = {e for experts in new.values() for e in experts}
    for e in range(num_experts):
        if e not in taken:
            target = min(active, key=lambda p: (len(new[p]), p))
            new[target].append(e)
            taken.add(e)
    while True:
        most = max(active, key=lambda p: (len(new[p]), -p))
        least = min(active, key=lambda p: (len(new[p]), p))
        if len(new[most]) - len(new[least]) <= 1:
            break
        new[least].append(new[most].pop())  # the highest expert of the busiest node
    return {p: tuple(sorted(new[p])) for p in active}


def _node_loads(owners: Mapping[int, Sequence[int]], load: Sequence[float]) -> dict[int, float]:
    return {p: sum(load[e] for e in experts) for p, experts in owners.items()}


def balance_by_load(
    owners: Mapping[int, Sequence[int]], expert_load: Sequence[float], tolerance: float, max_swaps: int | None = None
) -> dict[int, tuple[int, ...]]:
    """Swap experts between nodes so each node's summed `expert_load` is as even as possible.

    Greedy: apply the pairwise swap that lowers the max-min spread of per-node load most, until no
    swap lowers it by more than `tolerance` x the mean per-node load. The bar is a share of a
    node's fair load, not of the current spread, so a nearly even assignment is left alone rather
    than reshuffled to chase measurement noise. Swaps keep every node's number of experts (its
    memory) and the one-owner-per-expert invariant. `max_swaps` caps the swaps of one call (None:
    until no swap helps), so one decision cannot move much on the strength of one window's reports.
    """
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    owned = sorted(e for experts in owners.values() for e in experts)
    if owned != list(range(len(expert_load))):
        raise ValueError(f"owners must cover experts 0..{len(expert_load) - 1} exactly once, got {dict(owners)}")
    if any(not math.isfinite(x) or x < 0 for x in expert_load):
        raise ValueError(f"expert loads must be finite and >= 0, got {list(expert_load)}")
    new = {p: sorted(experts) for p, experts in owners.items()}
    if not new:
        return {}
    bar = tolerance * sum(expert_load) / len(new)
    swaps = 0
    while max_swaps is None or swaps < max_swaps:
        sums = _node_loads(new, expert_load)
        spread = max(sums.values()) - min(sums.values())
        best, best_spread = None, spread
        for i, j in itertools.combinations(sorted(new), 2):
            for a in new[i]:
                for b in new[j]:
                    delta = expert_load[b] - expert_load[a]  # node i gains delta, node j loses it
                    moved = {**sums, i: sums[i] + delta, j: sums[j] - delta}
                    after = max(moved.values()) - min(moved.values())
                    if after < best_spread - 1e-12:
                        best, best_spread = (i, a, j, b), after
        if best is None or spread - best_spread <= bar:
            break
        i, a, j, b = best
        new[i].remove(a), new[j].remove(b)
        new[i].append(b), new[j].append(a)
        swaps += 1
    return {p: tuple(sorted(experts)) for p, experts in new.items()}


def speed_counts(speed: Mapping[int, float], num_experts: int) -> dict[int, int]:
    """Experts per node proportional to `speed`, at least one each, summing to `num_experts`
    (largest remainder: floor of each quota, the rest to the largest fractional parts)."""
    nodes = sorted(speed)
    if not nodes:
        raise ValueError("no node to give experts to")
    if num_experts < len(nodes):
        raise ValueError(f"need at least one expert per node, got {num_experts} experts for {len(nodes)} nodes")
    if any(not math.isfinite(speed[p]) or speed[p] <= 0 for p in nodes):
        raise ValueError(f"node speeds must be finite and > 0, got {dict(speed)}")
    total = sum(speed[p] for p in nodes)
    quota = {p: num_experts * speed[p] / total for p in nodes}
    counts = {p: max(1, math.floor(quota[p])) for p in nodes}
    while sum(counts.values()) < num_experts:
        counts[max(nodes, key=lambda p: (quota[p] - counts[p], -p))] += 1
    while sum(counts.values()) > num_experts:  # only when the minimum of one pushed a node over its quota
        counts[min((p for p in nodes if counts[p] > 1), key=lambda p: (quota[p] - counts[p], p))] -= 1
    return counts


def cap_counts(old: Mapping[int, int], proposed: Mapping[int, int], max_change: int) -> dict[int, int]:
    """`proposed` expert counts with each node's change from `old` clipped to +-`max_change`, still
    summing to the same total and at least one each: the clipped surplus or shortfall is settled by the
    nodes furthest from their proposal that still have room (lowest partition id on ties)."""
    if set(old) != set(proposed) or sum(old.values()) != sum(proposed.values()):
        raise ValueError(f"old {dict(old)} and proposed {dict(proposed)} counts must cover the same nodes and total")
    if max_change < 1:
        raise ValueError(f"max_change must be >= 1, got {max_change}")
    lo = {p: max(1, old[p] - max_change) for p in old}
    hi = {p: old[p] + max_change for p in old}
    counts = {p: min(max(proposed[p], lo[p]), hi[p]) for p in old}
    total = sum(old.values())
    while sum(counts.values()) > total:
        p = max((p for p in counts if counts[p] > lo[p]), key=lambda p: (counts[p] - proposed[p], -p))
        counts[p] -= 1
    while sum(counts.values()) < total:
        p = max((p for p in counts if counts[p] < hi[p]), key=lambda p: (proposed[p] - counts[p], -p))
        counts[p] += 1
    return counts


def balance_by_speed(
    owners: Mapping[int, Sequence[int]], speed: Mapping[int, float], max_change: int | None = None
) -> dict[int, tuple[int, ...]]:
    """Faster nodes own more experts: counts proportional to `speed` (tokens/s), at least one each.

    Nothing moves while every node's count is within one expert of its exact quota (any such
    count is as fair a rounding as another; this keeps noisy speeds from shuffling experts back
    and forth). Otherwise counts go to `speed_counts` with the fewest moves: each node keeps its
    lowest experts up to its new count and the released ones fill the nodes that need more.
    `max_change` caps how many experts a node gains or loses in one call (None: no cap).
    """
    if set(speed) != set(owners):
        raise ValueError(f"need a speed for every node: owners {sorted(owners)}, speeds {sorted(speed)}")
    num_experts = sum(len(experts) for experts in owners.values())
    counts = speed_counts(speed, num_experts)
    if max_change is not None:
        counts = cap_counts({p: len(owners[p]) for p in owners}, counts, max_change)
    total = sum(speed.values())
    if all(len(owners[p]) >= 1 and abs(len(owners[p]) - num_experts * speed[p] / total) < 1 for p in owners):
        return {p: tuple(sorted(experts)) for p, experts in owners.items()}
    new = {p: sorted(owners[p])[: counts[p]] for p in sorted(owners)}
    released = sorted(e for p in owners for e in sorted(owners[p])[counts[p] :])
    for p in sorted(owners):
        while len(new[p]) < counts[p]:
            new[p].append(released.pop(0))
    return {p: tuple(sorted(experts)) for p, experts in new.items()}
