"""Balancing across nodes: the federation's expert load and the routing bias the coordinator keeps.

Every round the valid replies' per-layer expert load ([layers][experts] token shares, weighted by
the tokens each node trained) becomes the federation's load; it goes back to every node (a node may
mix it into its balancing loss, `train.balance_global_weight`). With `router_bias_rate` > 0 an
aux-loss-free routing bias (DeepSeek-V3) moves toward balance by that rate every round; nodes add
it to the router probabilities for the top-k choice (model/routing.py).

A node's load report steers routing, so no single node may decide it: with three or more reports
the federation's load is the coordinate-wise median of the nodes' shares (each layer renormalised
to sum to 1), which one node of N >= 3 cannot move past the honest nodes' range; with fewer it is
the token-weighted mean. The bias moves by `router_bias_rate` per round and stays within
+-BIAS_LIMIT_STEPS of those steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from common import keys
from model.routing import global_load, imbalance, update_bias

BIAS_LIMIT_STEPS = 25  # the bias stays within +-25 x router_bias_rate (0.25 at the suggested 0.01)
MEDIAN_FROM = 3  # reports needed before the median replaces the token-weighted mean
STARVING_SHARE = 0.1  # an expert getting under this fraction of the uniform share 1/E ...
STARVING_ROUNDS = 3  # ... for this many reported rounds in a row is starving


class FederationLoad:
    def __init__(self, bias_rate: float) -> None:
        self.bias_rate = bias_rate
        self.load: list[list[float]] | None = None  # last round's, [layers][experts]
        self.bias: list[list[float]] | None = None  # None while the bias is off
        self.low_rounds: dict[tuple[int, int], int] = {}  # (layer, expert) -> rounds in a row under the bar

    def update(self, reports: Sequence[tuple[Any, float]]) -> dict[str, float]:
        """Take this round's (expert load, tokens) reports; the imbalance stats of the round record
        (max/mean tokens per expert, mean over layers and worst layer), or {} without reports."""
        load = robust_load(reports)
        if load is None:
            return {}
        self.load = load
        if self.bias_rate > 0:
            moved = update_bias(self.bias or [[0.0] * len(row) for row in load], load, self.bias_rate)
            limit = BIAS_LIMIT_STEPS * self.bias_rate
            self.bias = [[min(max(b, -limit), limit) for b in row] for row in moved]
        self._count_low(load)
        mean, worst = imbalance(load)
        return {"expert_imbalance": mean, "expert_imbalance_max": worst, "starving_experts": self.starving()}

    def _count_low(self, load: list[list[float]]) -> None:
        for layer, row in enumerate(load):
            bar = STARVING_SHARE / len(row)
            for expert, share in enumerate(row):
                key = (layer, expert)
                if share < bar:
                    self.low_rounds[key] = self.low_rounds.get(key, 0) + 1
                else:
                    self.low_rounds.pop(key, None)

    def starving(self) -> list[list[int]]:
        """[layer, expert] of every expert under STARVING_SHARE of its uniform share for
        STARVING_ROUNDS reported rounds in a row: it barely trains, and what it holds is barely used."""
        return sorted([list(k) for k, n in self.low_rounds.items() if n >= STARVING_ROUNDS])

    def train_config(self) -> dict[str, list[float]]:
        """What a training message carries: the load and the bias, flattened, when there are any."""
        out = {}
        if self.load is not None:
            out[keys.GLOBAL_LOAD] = _flat(self.load)
        out.update(self.eval_config())
        return out

    def eval_config(self) -> dict[str, list[float]]:
        """What an evaluation message carries: the bias (the evaluated model routes with it)."""
        return {} if self.bias is None else {keys.ROUTER_BIAS: _flat(self.bias)}

    def state_dict(self) -> dict[str, Any]:
        low = [[layer, expert, n] for (layer, expert), n in sorted(self.low_rounds.items())]
        return {"global_load": self.load, "router_bias": self.bias, "low_load_rounds": low}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load = state.get("global_load")
        self.bias = state.get("router_bias") if self.bias_rate > 0 else None
        self.low_rounds = {(int(layer), int(e)): int(n) for layer, e, n in state.get("low_load_rounds", [])}


def robust_load(reports: Sequence[tuple[Any, float]]) -> list[list[float]] | None:
    """The federation's per-layer load from (load[L][E], tokens) reports: the coordinate-wise median of
    the reports with tokens (rows renormalised to sum to 1) when there are MEDIAN_FROM or more, else
    their token-weighted mean; None without any. NaN marks an expert the node does not hold
    (partial residency): left out of that expert's median, 0 in the mean."""
    reports = [(load, w) for load, w in reports if load and w > 0]
    if len(reports) < MEDIAN_FROM:
        return global_load(
            [(torch.tensor(load, dtype=torch.float64).nan_to_num(0.0).tolist(), w) for load, w in reports]
        )
    stacked = torch.tensor([load for load, _ in reports], dtype=torch.float64)
    # The midpoint of the middle two for an even count; over the nodes that hold the expert (an
    # absent one is NaN: with `mask` residency the nodes' supports are disjoint and a median over
    # every node would be 0 for every expert).
    median = stacked.nanquantile(0.5, dim=0).nan_to_num(0.0)
    return (median / median.sum(dim=1, keepdim=True).clamp_min(1e-12)).tolist()


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]
