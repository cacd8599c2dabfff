"""What one round was: the record the strategy writes when it aggregates, the coordinator completes
with its held-out evaluation, and the run log keeps as one line of metrics.jsonl.

Written in one place per phase: `SpesStrategy.aggregate_train` (who replied, what was applied, bytes,
tokens, ownership), `SpesStrategy.aggregate_evaluate` (the nodes' evaluation), the coordinator's
round loop (held-out loss, wall time). Everyone else reads it by attribute; `from_dict` reads a
metrics.jsonl line back (fields a line lacks stay None, keys this version does not know are dropped).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundRecord:
    round: int
    global_step: int = 0
    merge_alpha: float = 0.0
    applied: bool = False
    refused: str = ""  # why nothing was applied ("" when applied)
    valid_updates: int = 0
    tokens: float = 0.0  # tokens trained by the nodes whose updates were applied
    train_loss: float = math.nan  # token-weighted mean over those nodes (the loss they optimise, aux terms included)
    bytes_up: int = 0  # tensor payload as encoded, all nodes
    bytes_down: int = 0
    wire_bytes_up: int = 0  # the serialised arrays, headers included
    wire_bytes_down: int = 0
    # partition id -> what the coordinator recorded of that node this round: status, bytes and the
    # node's reported metrics (num_tokens, train_loss, expert_load, tokens_per_s, ...)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    owners: dict[str, list[int]] = field(default_factory=dict)  # partition id -> experts, after this round
    fragment: int | None = None  # streaming fragments: the one this round synced (None: everything)
    expert_imbalance: float | None = None  # max/mean tokens per expert, mean over layers
    expert_imbalance_max: float | None = None  # ... the worst layer
    starving_experts: list[list[int]] | None = None  # [layer, expert]s long under a tenth of their share
    federated_eval_loss: float | None = None  # the nodes' own held-out evaluation, token-weighted
    eval_bytes_down: float | None = None
    val_loss: float | None = None  # the coordinator's held-out evaluation of the new global model
    val_ppl: float | None = None
    val_loss_without_bias: float | None = None  # ... without the routing bias (what the exported model scores)
    wall_s: float | None = None  # since the run (or the resumed run) started
    # The acceptance test (strategy/guard.py): guard loss with every update and as applied, the bar,
    # partitions excluded, models scored.
    guard: dict[str, Any] | None = None
    # Where the coordinator's round went (server_app/coordinator.py): seconds per phase, and the
    # wall-clock time (Unix seconds) the train messages left, to line up with the nodes' logs.
    timing: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The metrics.jsonl line: every field that is set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        """A metrics.jsonl line back; a null (a non-finite number when written) takes the field's default."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})

    @classmethod
    def of_round(
        cls, server_round: int, global_step: int, nodes: dict[int, dict[str, Any]], used: set[int], **fields: Any
    ) -> RoundRecord:
        """The strategy's part: who replied, tokens and loss of the used updates, bytes; `fields` the rest."""
        tokens = sum(n.get("num_tokens", 0.0) for p, n in nodes.items() if p in used)
        # train-loss is optional in a reply: the mean is over the nodes that reported one.
        reported = [
            (n["train_loss"], n.get("num_tokens", 0.0)) for p, n in nodes.items() if p in used and "train_loss" in n
        ]
        loss_tokens = sum(t for _, t in reported)
        return cls(
            round=server_round,
            global_step=global_step,
            valid_updates=len(used),
            tokens=tokens if fields.get("applied") else 0.0,
            train_loss=sum(loss * t for loss, t in reported) / loss_tokens if loss_tokens else float("nan"),
            bytes_up=sum(n["bytes_up"] for n in nodes.values()),
            bytes_down=sum(n["bytes_down"] for n in nodes.values()),
            wire_bytes_up=sum(n["wire_bytes_up"] for n in nodes.values()),
            wire_bytes_down=sum(n["wire_bytes_down"] for n in nodes.values()),
            nodes={str(p): n for p, n in nodes.items()},
            **fields,
        )

    def failed_nodes(self) -> dict[str, str]:
        """partition id -> status of every node whose update was not used."""
        return {p: n.get("status", "?") for p, n in self.nodes.items() if n.get("status") != "ok"}
