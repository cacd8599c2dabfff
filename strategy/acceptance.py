"""From a round's checked updates to the next global model, or to a refusal (no Flower, no training).

Order: quorum; clip every update to the round's honest scale (strategy/robust.py); aggregate and
merge; the guard's acceptance test, excluding updates that explain a rise (strategy/guard.py);
refuse a result that still holds a NaN or Inf, or that the guard cannot score. Building a
candidate never moves the outer optimizer's momentum: only the accepted one's is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.checks import all_finite
from common.spec import StrategyConfig
from strategy.aggregation import aggregate
from strategy.guard import Verdict, screen, tolerance
from strategy.merging import merge_experts
from strategy.outer import OuterOptimizer
from strategy.robust import Updates, clip_updates

Params = dict[str, torch.Tensor]


@dataclass
class Outcome:
    params: Params | None  # the new global model; None when the round is refused
    step: int
    alpha: float = 0.0  # the merge applied (0 when refused)
    refused: str = ""
    clipped: dict[int, int] = field(default_factory=dict)  # partition -> tensors clipped
    scale: dict[int, dict[str, float]] = field(default_factory=dict)  # partition -> largest norm / median norm
    cosine: dict[int, float] = field(default_factory=dict)  # partition -> agreement with the others' update
    dropped: dict[int, str] = field(default_factory=dict)  # partition -> why the guard dropped its update
    verdict: Verdict | None = None


def _candidates(
    params: Params,
    updates: Updates,
    trainers,
    outer: OuterOptimizer,
    cfg: StrategyConfig,
    alpha: float,
    synced=lambda name: True,
):
    """excluded partitions -> (the aggregate without them, merged; the outer momentum it would leave).

    The outer optimizer's buffers are restored after each build; the latest build is kept, since
    the one the guard scored last is usually the one applied."""
    last: dict[frozenset[int], tuple[Params, dict[str, torch.Tensor]]] = {}

    def candidate(excluded: frozenset[int]) -> tuple[Params, dict[str, torch.Tensor]]:
        if excluded not in last:
            saved = {k: v.clone() for k, v in outer.buffers.items()}
            kept = {p: u for p, u in updates.items() if p not in excluded}
            new = aggregate(params, kept, trainers, outer, cfg.trim_fraction, cfg.median)
            if alpha:  # only the layers synced this round (streaming fragments; else all)
                new.update(merge_experts({k: v for k, v in new.items() if synced(k)}, alpha, cfg.merge.top_k))
            moved, outer.buffers = outer.buffers, saved
            last.clear()
            last[excluded] = (new, moved)
        return last[excluded]

    return candidate


def _screen(candidate, guard, cfg: StrategyConfig, nodes: list[int], suspects: list[int]) -> Verdict:
    """The guard's verdict on the round (strategy/guard.py)."""
    score, losses = guard
    g = cfg.guard
    tol = tolerance(losses, g.tolerance, g.noise_factor, g.window)
    # A minority: a majority's rise is the federation's; of two nodes one can be at fault; one alone, no telling.
    limit = (len(nodes) - 1) // 2 if len(nodes) >= 3 else len(nodes) - 1
    return screen(lambda ex: score(candidate(ex)[0]), nodes, losses[-1], tol, limit, suspects)


def accept_round(
    params: Params,
    updates: Updates,
    trainers: Callable[[str], set[int]],
    outer: OuterOptimizer,
    cfg: StrategyConfig,
    global_step: int,
    quorum: int,
    guard: tuple[Callable[[Params], float], list[float]] | None = None,
    synced: Callable[[str], bool] = lambda name: True,
) -> Outcome:
    """The round's outcome. `guard`: (guard loss of a model, guard losses of the accepted models);
    `synced`: the parameters this round syncs (a merge moves no other)."""
    step = global_step + cfg.local_steps
    if not updates or len(updates) < quorum:
        return Outcome(None, global_step, refused=f"{len(updates)} valid update(s), quorum {quorum}")
    clipping = clip_updates(params, updates, trainers, cfg.clip_shared, cfg.clip_experts)
    updates = clipping.updates
    # With streaming fragments the synced fragment's last sync was F - 1 rounds earlier: a merge
    # point since then is due for its layers (each fragment gets every merge, at its own turn).
    since = max(global_step - (cfg.fragments - 1) * cfg.local_steps, 0)
    alpha = cfg.merge.alpha(step) if cfg.merge.due(since, step) else 0.0

    candidate = _candidates(params, updates, trainers, outer, cfg, alpha, synced)
    # With the overlap a node keeps `fragment_mix` of its own drift, and those offsets sum to about zero
    # over the nodes, so an honest update points partly against the others': only clipping makes a suspect.
    suspects = sorted(clipping.clipped) if cfg.fragment_overlap else clipping.suspects
    verdict = None if guard is None else _screen(candidate, guard, cfg, sorted(updates), suspects)
    excluded = frozenset(verdict.excluded if verdict else ())
    outcome = Outcome(
        None,
        global_step,
        clipped=clipping.clipped,
        scale=clipping.scale,
        cosine=clipping.cosine,
        verdict=verdict,
    )
    outcome.dropped = {
        p: f"dropped by the guard: guard loss {verdict.first_loss:.4g} with it, {verdict.evidence[p]:.4g} "
        f"without it, bar {verdict.bar:.4g}{', clipped' if p in clipping.clipped else ''}"
        f"{f', cosine {clipping.cosine[p]:.2f} with the others' if clipping.cosine.get(p, 1.0) < 0 else ''}"
        for p in excluded
    }
    if len(updates) - len(excluded) < quorum:
        outcome.refused = f"{len(updates) - len(excluded)} update(s) after the guard, quorum {quorum}"
        return outcome
    new, buffers = candidate(excluded)
    bad = next((n for n, t in new.items() if not all_finite(t)), None)
    if bad is not None:
        outcome.refused = f"the new global {bad} would hold NaN or Inf"
    elif verdict is not None and not math.isfinite(verdict.loss):
        outcome.refused = "the guard loss of the new global model is not finite"
    else:
        outer.buffers = buffers
        outcome.params, outcome.step, outcome.alpha = new, step, alpha
    return outcome
