"""Balancing across nodes: the federation's expert load and the routing bias the coordinator keeps.

Every round the valid replies' per-layer expert load ([layers][experts] token shares, weighted by
the tokens each node trained) becomes the federation's load; it goes back to every node (a node may
mix it into its balancing loss, `train.balance_global_weight`). With `router_bias_rate` > 0 an
aux-loss-free routing bias (DeepSeek-V3) moves toward balance by that rate every round; nodes add
it to the router probabilities for the top-k choice (model/routing.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common import keys
from model.routing import global_load, imbalance, update_bias


class FederationLoad:
    def __init__(self, bias_rate: float) -> None:
        self.bias_rate = bias_rate
        self.load: list[list[float]] | None = None  # last round's, [layers][experts]
        self.bias: list[list[float]] | None = None  # None while the bias is off

    def update(self, reports: Sequence[tuple[Any, float]]) -> dict[str, float]:
        """Take this round's (expert load, tokens) reports; the imbalance stats of the round record
        (max/mean tokens per expert, mean over layers and worst layer), or {} without reports."""
        load = global_load(list(reports))
        if load is None:
            return {}
        self.load = load
        if self.bias_rate > 0:
            self.bias = update_bias(self.bias or [[0.0] * len(row) for row in load], load, self.bias_rate)
        mean, worst = imbalance(load)
        return {"expert_imbalance": mean, "expert_imbalance_max": worst}

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
        return {"global_load": self.load, "router_bias": self.bias}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load = state.get("global_load")
        self.bias = state.get("router_bias") if self.bias_rate > 0 else None


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]
