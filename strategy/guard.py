"""The acceptance test of a round: does the new global model score worse than the last one?

Before a round's aggregate becomes the global model the coordinator scores it on a small guard
split (held-out text, apart from the split it reports). Let L_0, L_1, ... be the guard losses
of the models accepted so far and D_i = L_i - L_{i-1} their round-to-round changes. The round's
aggregate, with loss L, passes when

    L - L_prev <= tol,   tol = max(rel * L_prev, k * 1.4826 * MAD(D over the last w rounds))

(the MAD scaled to a standard deviation: the rounds' own noise, robust to one odd round; `rel`
keeps the first rounds, which have no history, from flagging honest noise). Otherwise the
responsible updates are found by leave-one-out: re-aggregate without each node and score again;
the node whose absence lowers the loss most, by more than tol, is excluded, and the search
repeats on the rest while the loss still fails the test, up to `limit` nodes. A rise that no
single node explains (every update moved the model the same way) is accepted: it is the
federation's own doing, not one node's. An update that had to be clipped (strategy/robust.py) is
on probation even in a passing round: it stays only if the aggregate without it scores no better.
A clipped update still pulls the model at most as far as an honest one, but every round and in
the direction the attacker chose; this is what catches that.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MAD_TO_STD = 1.4826  # a normal distribution's standard deviation per unit of median absolute deviation


def tolerance(losses: Sequence[float], rel: float, noise_factor: float, window: int) -> float:
    """How much the guard loss may rise over `losses[-1]` (see the module docstring)."""
    changes = [b - a for a, b in zip(losses[:-1], losses[1:])][-window:]
    noise = 0.0
    if len(changes) >= 3:
        mid = statistics.median(changes)
        noise = MAD_TO_STD * statistics.median(abs(c - mid) for c in changes)
    return max(rel * abs(losses[-1]), noise_factor * noise)


def _finite(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


@dataclass
class Verdict:
    loss: float  # guard loss of the aggregate without the excluded nodes
    first_loss: float  # ... and of the aggregate of every update
    bar: float  # the largest loss that passes: L_prev + tol
    excluded: list[int] = field(default_factory=list)
    evidence: dict[int, float] = field(default_factory=dict)  # node -> guard loss without it (first search)
    evaluations: int = 1
    seconds: float = 0.0  # spent scoring

    @property
    def passed(self) -> bool:
        return self.first_loss <= self.bar

    def summary(self) -> dict[str, float | int | list[int]]:
        """What metrics.jsonl keeps of it."""
        return {
            "loss": self.loss,
            "first_loss": self.first_loss,
            "bar": self.bar,
            "excluded": self.excluded,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
        }


def screen(
    loss_without: Callable[[frozenset[int]], float],
    nodes: Sequence[int],
    previous: float,
    tol: float,
    limit: int,
    suspects: Sequence[int] = (),
) -> Verdict:
    """Score the round's aggregate; if it fails, exclude the updates that explain the rise. Then each of
    `suspects` (nodes whose update had to be clipped) still in is excluded if the loss is lower without it.

    `loss_without(S)`: guard loss of the aggregate of every node's update except those in S."""
    t0 = time.perf_counter()
    bar = previous + tol
    current = _finite(loss_without(frozenset()))
    verdict = Verdict(loss=current, first_loss=current, bar=bar)
    excluded: frozenset[int] = frozenset()
    while current > bar and len(excluded) < limit:
        trials = {p: _finite(loss_without(excluded | {p})) for p in nodes if p not in excluded}
        verdict.evaluations += len(trials)
        if not verdict.evidence:
            verdict.evidence = dict(trials)
        best = min(sorted(trials), key=lambda p: trials[p])
        if not trials[best] < current - tol:
            break
        excluded, current = excluded | {best}, trials[best]
    for p in suspects:
        if p in excluded or len(excluded) >= limit:
            continue
        trial = _finite(loss_without(excluded | {p}))
        verdict.evaluations += 1
        verdict.evidence.setdefault(p, trial)
        if trial < current:
            excluded, current = excluded | {p}, trial
    verdict.loss, verdict.excluded = current, sorted(excluded)
    verdict.seconds = time.perf_counter() - t0
    return verdict
