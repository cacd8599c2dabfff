"""SpesStrategy: sparse expert synchronisation as a Flower Message-API strategy."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from model.naming import expert_param_names, parse_expert_param, shared_param_names
from strategy.aggregation import aggregate
from strategy.assignment import Ownership, make_assignment, rank_partitions
from strategy.codec import decode, encode, payload_bytes
from strategy.merging import MergeSchedule, merge_experts
from strategy.outer import OuterOptimizer
from strategy.validation import InvalidUpdate, validate_update

log = logging.getLogger("spes.strategy")

# Metric keys a node reports after training (see client_app/app.py).
NODE_METRICS = (
    "train-loss", "ce-loss", "aux-loss", "z-loss", "num-tokens", "tokens-per-s", "peak-mem-mb", "train-seconds",
    "trainable-params",
)


def node_metrics(metrics, num_experts: int) -> dict:
    """A node's reported metrics as the run log records them: snake_case floats, expert load per layer."""
    out = {k.replace("-", "_"): float(metrics[k]) for k in NODE_METRICS if k in metrics}
    if "expert-load" in metrics:
        load = [float(x) for x in metrics["expert-load"]]  # flattened [layers * experts]
        out["expert_load"] = [load[i : i + num_experts] for i in range(0, len(load), num_experts)]
    return out


@dataclass
class SpesConfig:
    local_steps: int = 100
    assignment: str = "contiguous"  # contiguous (SPES) | replicated (every node trains every expert)
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov: bool = False
    merge: MergeSchedule = field(default_factory=MergeSchedule)
    # Federated evaluation on the nodes' held-out shards every k rounds; 0 = last round only.
    federated_eval_every: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SpesConfig":
        d = dict(d)
        d.pop("name", None)
        merge = MergeSchedule(**d.pop("merge", {}))
        return cls(merge=merge, **d)

    def validate(self, num_experts: int, num_nodes: int) -> None:
        if self.local_steps < 1:
            raise ValueError(f"strategy.local_steps must be >= 1, got {self.local_steps}")
        make_assignment(self.assignment, num_experts, num_nodes)
        self.merge.validate(num_experts)
        if self.federated_eval_every < 0:
            raise ValueError("strategy.federated_eval_every must be >= 0")


class SpesStrategy(Strategy):
    """One message per node with what it needs; experts from their owners; shared weights averaged.

    `node_partitions` maps Flower node id -> partition id; node index p (the owner of expert
    block p) is the rank of its partition id. All state needed to continue a run is in
    `state_dict()`.
    """

    def __init__(
        self, cfg: SpesConfig, num_experts: int, node_partitions: Mapping[int, int], num_rounds: int
    ) -> None:
        self.cfg = cfg
        node_ids = list(node_partitions)
        ranks = rank_partitions([node_partitions[n] for n in node_ids])
        self.node_ids: list[int] = [n for _, n in sorted(zip(ranks, node_ids))]
        self.partitions: list[int] = [node_partitions[n] for n in self.node_ids]
        cfg.validate(num_experts, len(self.node_ids))
        self.ownership: Ownership = make_assignment(cfg.assignment, num_experts, len(self.node_ids))
        self.outer = OuterOptimizer(cfg.outer_lr, cfg.outer_momentum, cfg.nesterov)
        self.num_rounds = num_rounds
        self.params: dict[str, torch.Tensor] = {}
        self.round = 0
        self.global_step = 0
        # A node needs the full model on first contact, after merging changed its own experts,
        # or when the global copy of its experts is not exactly what it last sent.
        self.needs_full = [True] * len(self.node_ids)
        self.history: list[dict[str, Any]] = []
        self._sent: dict[int, int] = {}
        self._eval_sent: dict[int, int] = {}

    # -- names ---------------------------------------------------------------------------
    def _expected_update(self, p: int) -> set[str]:
        names = list(self.params)
        return set(shared_param_names(names)) | set(expert_param_names(names, self.ownership.experts_of(p)))

    def _downlink_names(self, p: int) -> list[str]:
        names = list(self.params)
        if self.needs_full[p]:
            return names
        own = set(self.ownership.experts_of(p))
        return [n for n in names if (e := parse_expert_param(n)) is None or e.expert not in own]

    def _trainers(self, name: str) -> set[int]:
        e = parse_expert_param(name)
        if e is None:
            return set(range(len(self.node_ids)))
        return set(self.ownership.trainers_of(e.expert))

    # -- Flower Strategy API --------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.params:
            self.params = decode(arrays)
        self.round = server_round
        messages = []
        self._sent = {}
        for p, node_id in enumerate(self.node_ids):
            record = encode(self.params, self._downlink_names(p))
            self._sent[p] = payload_bytes(record)
            node_cfg = ConfigRecord(
                {
                    **dict(config),
                    "server-round": server_round,
                    "global-step": self.global_step,
                    "local-steps": self.cfg.local_steps,
                    "owned-experts": list(self.ownership.experts_of(p)),
                    "full-model": self.needs_full[p],
                    "node-index": p,
                }
            )
            content = RecordDict({"arrays": record, "config": node_cfg})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        index_of = {n: p for p, n in enumerate(self.node_ids)}
        nodes: dict[int, dict[str, Any]] = {
            p: {"partition_id": self.partitions[p], "bytes_down": self._sent.get(p, 0), "bytes_up": 0, "status": "no reply"}
            for p in range(len(self.node_ids))
        }
        updates: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        for msg in replies:
            p = index_of.get(msg.metadata.src_node_id)
            if p is None:
                log.warning("reply from unknown node %s ignored", msg.metadata.src_node_id)
                continue
            if msg.has_error():
                nodes[p]["status"] = f"error: {msg.error.reason}"
                log.warning("node %d (partition %d) failed: %s", p, self.partitions[p], msg.error.reason)
                continue
            try:
                record = msg.content["arrays"]
                update = decode(record)
                validate_update(update, self._expected_update(p), self.params)
                metrics = msg.content["metrics"]
            except (InvalidUpdate, KeyError, TypeError, ValueError) as exc:
                nodes[p]["status"] = f"rejected: {exc}"
                log.warning("update of node %d (partition %d) rejected: %s", p, self.partitions[p], exc)
                continue
            nodes[p].update(node_metrics(metrics, self.ownership.num_experts))
            nodes[p]["bytes_up"] = payload_bytes(record)
            nodes[p]["status"] = "ok"
            updates[p] = (update, float(metrics.get("num-tokens", 0.0)))

        if not updates:
            log.warning("round %d: no valid update; global model unchanged", server_round)
        self.params = aggregate(self.params, updates, self._trainers, self.outer)
        prev_step, self.global_step = self.global_step, self.global_step + self.cfg.local_steps
        alpha = 0.0
        if self.cfg.merge.due(prev_step, self.global_step):
            alpha = self.cfg.merge.alpha(self.global_step)
            self.params.update(merge_experts(self.params, alpha, self.cfg.merge.top_k))

        exclusive_copy = self.outer.is_plain_average
        for p in range(len(self.node_ids)):
            own_exclusive = all(len(self.ownership.trainers_of(e)) == 1 for e in self.ownership.experts_of(p))
            self.needs_full[p] = alpha > 0 or p not in updates or not (exclusive_copy and own_exclusive)

        tokens = sum(n.get("num_tokens", 0.0) for n in nodes.values())
        loss = sum(n.get("train_loss", 0.0) * n.get("num_tokens", 0.0) for n in nodes.values())
        record = {
            "round": server_round,
            "global_step": self.global_step,
            "merge_alpha": alpha,
            "tokens": tokens,
            "train_loss": loss / tokens if tokens else float("nan"),
            "bytes_up": sum(n["bytes_up"] for n in nodes.values()),
            "bytes_down": sum(n["bytes_down"] for n in nodes.values()),
            "nodes": {str(n["partition_id"]): n for n in nodes.values()},
        }
        self.history.append(record)
        metrics = MetricRecord(
            {k: float(record[k]) for k in ("global_step", "merge_alpha", "tokens", "train_loss", "bytes_up", "bytes_down")}
        )
        return encode(self.params), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        every = self.cfg.federated_eval_every
        if not (server_round == self.num_rounds or (every and server_round % every == 0)):
            return []
        messages = []
        self._eval_sent = {}
        for p, node_id in enumerate(self.node_ids):
            content = RecordDict(
                {"arrays": arrays, "config": ConfigRecord({**dict(config), "server-round": server_round, "node-index": p})}
            )
            self._eval_sent[p] = payload_bytes(arrays)
            messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node_id))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        total, tokens = 0.0, 0.0
        for msg in replies:
            if msg.has_error():
                log.warning("evaluation failed on node %s: %s", msg.metadata.src_node_id, msg.error.reason)
                continue
            m = msg.content["metrics"]
            total += float(m["eval-loss"]) * float(m["num-tokens"])
            tokens += float(m["num-tokens"])
        if not tokens:
            return None
        result = {"federated_eval_loss": total / tokens, "eval_bytes_down": float(sum(self._eval_sent.values()))}
        if self.history and self.history[-1]["round"] == server_round:
            self.history[-1].update(result)
        return MetricRecord(result)

    def summary(self) -> None:
        log.info(
            "SPES: %d nodes (partitions %s), experts per node %s, H=%d, outer lr=%g momentum=%g, merge %s",
            len(self.node_ids),
            self.partitions,
            [len(o) for o in self.ownership.owners],
            self.cfg.local_steps,
            self.cfg.outer_lr,
            self.cfg.outer_momentum,
            asdict(self.cfg.merge),
        )

    # -- state to continue a run -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "global_step": self.global_step,
            "partitions": self.partitions,
            "ownership": self.ownership.to_dict(),
            "needs_full": self.needs_full,
            "config": asdict(self.cfg),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["partitions"]) != self.partitions:
            raise ValueError(f"saved run had partitions {state['partitions']}, this one has {self.partitions}")
        self.round = int(state["round"])
        self.global_step = int(state["global_step"])
        self.ownership = Ownership.from_dict(state["ownership"])
        self.needs_full = [True] * len(self.node_ids)  # nodes may have lost their state meanwhile
