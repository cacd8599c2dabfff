"""SpesStrategy: sparse expert synchronisation as a Flower Message-API strategy.

Membership is keyed by partition id (stable across restarts of a node, unlike Flower's node
id). Each round the coordinator's round loop (`server_app.rounds`) asks for the messages,
collects replies until quorum or deadline, and hands them to `aggregate_train`, which checks
every reply before any of it touches the global model. Nodes without a valid update for
`reassign_after` rounds lose their experts to the others; nodes that come back or join get
the full model and a share. `state_dict()` holds everything needed to continue the run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import keys
from common.checks import all_finite
from common.codec import DecodeError, decode, decode_sync, encode, payload_bytes, wire_bytes
from common.spec import MergeSchedule, StrategyConfig
from model.naming import expert_param_names, parse_expert_param, trained_param_names
from model.routing import global_load, imbalance, update_bias
from strategy.aggregation import aggregate
from strategy.assignment import Ownership, make_assignment, rank_partitions, rebalance
from strategy.load_aware import reconsider_owners
from strategy.merging import merge_experts
from strategy.outer import OuterOptimizer
from strategy.validation import InvalidUpdate, validate_eval_metrics, validate_train_metrics, validate_update
from strategy.versions import VersionedDownlink, apply

log = logging.getLogger("spes.strategy")

SpesConfig = StrategyConfig  # the name the strategy has always used for its config
SHADOW = "downlink-shadow/"  # checkpoint tensor prefix of the nodes' copy of the model (delta sync)
__all__ = ["MergeSchedule", "SpesConfig", "SpesStrategy", "Member", "node_metrics"]


def node_metrics(metrics, num_experts: int) -> dict:
    """A node's reported metrics as the run log records them (for trusted, local metrics)."""
    out = {k.replace("-", "_"): float(metrics[k]) for k in keys.NODE_METRICS if k in metrics}
    if keys.EXPERT_LOAD in metrics:
        load = [float(x) for x in metrics[keys.EXPERT_LOAD]]
        out["expert_load"] = [load[i : i + num_experts] for i in range(0, len(load), num_experts)]
    return out


@dataclass
class Member:
    partition_id: int
    node_id: int
    active: bool = True
    absent: int = 0          # rounds in a row without a valid update
    needs_full: bool = True  # send the whole model next time


class SpesStrategy(Strategy):
    def __init__(
        self,
        cfg: StrategyConfig,
        num_experts: int,
        node_partitions: Mapping[int, int],
        num_rounds: int,
        max_tokens: float = math.inf,
        max_eval_tokens: float = math.inf,
        num_layers: int | None = None,
        lora: bool = False,
    ) -> None:
        self.cfg = cfg
        self.lora = lora  # nodes train and send adapters, routers, norms and owned experts (model/lora.py)
        self.num_experts = num_experts
        self.num_layers = num_layers
        self.max_tokens = max_tokens  # the most tokens one node can train in a round
        self.max_eval_tokens = max_eval_tokens  # the most tokens one node evaluates
        pids = [node_partitions[n] for n in node_partitions]
        rank_partitions(pids)  # distinct
        cfg.validate(num_experts, len(pids))
        self.members: dict[int, Member] = {
            pid: Member(pid, node_id) for node_id, pid in sorted(node_partitions.items(), key=lambda kv: kv[1])
        }
        initial = make_assignment(cfg.assignment, num_experts, len(pids))
        self.owners: dict[int, tuple[int, ...]] = dict(zip(sorted(pids), initial.owners))
        self.outer = OuterOptimizer(cfg.outer_lr, cfg.outer_momentum, cfg.nesterov)
        self.num_rounds = num_rounds
        self.params: dict[str, torch.Tensor] = {}
        self.round = 0
        self.global_step = 0
        self.failed_rounds = 0  # in a row, below quorum
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # joins, departures, reassignments
        self._sent: dict[int, int] = {}           # pid -> bytes sent this round
        self._targets: dict[str, int] = {}        # message id -> pid, this round
        self._eval_sent: dict[int, int] = {}
        self._wire_sent: dict[int, int] = {}
        # Delta sync: the nodes' copy of the model and what each node holds (None: whole fp32 tensors).
        self.sync = VersionedDownlink(cfg.downlink, cfg.uplink) if cfg.delta_sync else None
        self._own_uplinks: dict[int, dict[str, dict]] = {}  # pid -> owned expert -> its uplink Arrays
        # Balancing across nodes: last round's expert load of the federation ([layers][experts]
        # token shares) goes back to every node, with the routing bias when router_bias_rate > 0.
        self.global_load: list[list[float]] | None = None
        self.router_bias: list[list[float]] | None = None

    # -- membership ------------------------------------------------------------------------
    @property
    def partitions(self) -> list[int]:
        return sorted(p for p, m in self.members.items() if m.active)

    @property
    def ownership(self) -> Ownership:
        """Ownership over the active members, in partition order (node index = rank)."""
        return Ownership(self.num_experts, tuple(self.owners[p] for p in self.partitions))

    @property
    def needs_full(self) -> dict[int, bool]:
        return {p: m.needs_full for p, m in self.members.items()}

    def experts_of(self, pid: int) -> tuple[int, ...]:
        return self.owners.get(pid, ())

    def _reassign(self, reason: str) -> None:
        self.set_owners(rebalance(self.owners, self.partitions, self.num_experts, self.cfg.assignment), reason)

    def set_owners(self, new: Mapping[int, tuple[int, ...]], reason: str, **extra: Any) -> None:
        """Replace the ownership; nodes whose experts changed get the full model; a change is a `reassign` event."""
        before = dict(self.owners)
        self.owners = dict(new)
        changes = {str(p): list(e) for p, e in self.owners.items() if before.get(p) != e}
        for p in changes:
            self.members[int(p)].needs_full = True
        if changes:
            self.events.append({"round": self.round, "event": "reassign", "reason": reason, "owners": changes, **extra})
            log.warning("round %d: experts reassigned (%s): %s", self.round, reason, changes)

    def add_node(self, node_id: int, pid: int) -> None:
        """A node joined (or came back, possibly under a new Flower node id)."""
        member = self.members.get(pid)
        if member is None:
            self.members[pid] = Member(pid, node_id)
            self.events.append({"round": self.round, "event": "join", "partition": pid})
        else:
            member.node_id, member.active, member.absent, member.needs_full = node_id, True, 0, True
            self.events.append({"round": self.round, "event": "return", "partition": pid})
        self._reassign(f"partition {pid} joined")

    def node_ids(self) -> list[int]:
        return [self.members[p].node_id for p in self.partitions]

    # -- names -------------------------------------------------------------------------------
    def _expected_update(self, pid: int) -> set[str]:
        names = list(self.params)
        return set(trained_param_names(names, self.experts_of(pid), self.lora))

    def _downlink_names(self, pid: int) -> list[str]:
        names = list(self.params)
        if self.members[pid].needs_full:
            return names
        own = set(self.experts_of(pid))
        return [n for n in names if (e := parse_expert_param(n)) is None or e.expert not in own]

    def _single_owner(self, name: str) -> int | None:
        e = parse_expert_param(name)
        owners = [] if e is None else [p for p in self.partitions if e.expert in self.owners[p]]
        return owners[0] if len(owners) == 1 else None

    def _num_owners(self, expert: int) -> int:
        return sum(expert in self.owners[p] for p in self.partitions)

    def _trainers(self, name: str) -> set[int]:
        e = parse_expert_param(name)
        if e is None:
            return set(self.partitions)
        return {p for p in self.partitions if e.expert in self.owners[p]}

    # -- Flower Strategy API --------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord, grid: Grid | None
    ) -> Iterable[Message]:
        if not self.params:
            self.params = decode(arrays)
        self.round = server_round
        messages = []
        self._sent, self._targets, self._wire_sent, self._own_uplinks = {}, {}, {}, {}
        if self.sync is not None:
            self.sync.refresh(self.params, self._single_owner)
        for pid in self.partitions:
            member = self.members[pid]
            sync_cfg = {}
            if self.sync is None:
                record = encode(self.params, self._downlink_names(pid))
            else:
                record, base_step, apply_own = self.sync.message(pid, member.needs_full)
                sync_cfg = {keys.BASE_STEP: base_step, keys.APPLY_OWN: apply_own}
            self._sent[pid] = payload_bytes(record)
            self._wire_sent[pid] = wire_bytes(record)
            node_cfg = ConfigRecord(
                {
                    **dict(config),
                    **sync_cfg,
                    keys.SERVER_ROUND: server_round,
                    keys.GLOBAL_STEP: self.global_step,
                    keys.LOCAL_STEPS: self.cfg.local_steps,
                    keys.OWNED_EXPERTS: list(self.experts_of(pid)),
                    keys.FULL_MODEL: member.needs_full,
                    keys.NODE_INDEX: self.partitions.index(pid),
                    **self._routing_config(),
                }
            )
            content = RecordDict({keys.ARRAYS: record, keys.CONFIG: node_cfg})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=member.node_id))
        return messages

    def _routing_config(self) -> dict[str, list[float]]:
        out = {}
        if self.global_load is not None:
            out[keys.GLOBAL_LOAD] = [x for row in self.global_load for x in row]
        if self.router_bias is not None:
            out[keys.ROUTER_BIAS] = [x for row in self.router_bias for x in row]
        return out

    def _update_routing(self, nodes: Mapping[int, dict[str, Any]], valid: Iterable[int]) -> dict[str, Any]:
        """The federation's expert load from this round's valid replies; moves the routing bias."""
        load = global_load([(nodes[p]["expert_load"], nodes[p]["num_tokens"]) for p in valid if "expert_load" in nodes[p]])
        if load is None:
            return {}
        self.global_load = load
        if self.cfg.router_bias_rate > 0:
            start = self.router_bias or [[0.0] * len(row) for row in load]
            self.router_bias = update_bias(start, load, self.cfg.router_bias_rate)
        mean, worst = imbalance(load)
        return {"expert_imbalance": mean, "expert_imbalance_max": worst}

    def register_sent(self, message_ids: Iterable[str], messages: Iterable[Message]) -> None:
        """Remember which partition each pushed message went to (replies are matched by it)."""
        by_node = {m.node_id: p for p, m in self.members.items() if m.active}
        self._targets = {mid: by_node[msg.metadata.dst_node_id] for mid, msg in zip(message_ids, messages) if mid}

    def _sender(self, msg: Message) -> int | None:
        pid = self._targets.get(msg.metadata.reply_to_message_id)
        if pid is not None:
            return pid
        if self._targets:
            return None  # a reply to a message of another round, or to nothing we sent
        for p in self.partitions:
            if self.members[p].node_id == msg.metadata.src_node_id:
                return p
        return None

    def _check_reply(self, pid: int, msg: Message) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        content = msg.content
        if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
            raise InvalidUpdate("reply needs an ArrayRecord 'arrays' and a MetricRecord 'metrics'")
        num_layers = self.num_layers or max((e.layer for n in self.params if (e := parse_expert_param(n))), default=0) + 1
        metrics = validate_train_metrics(
            content.metric_records[keys.METRICS], self.max_tokens, num_layers, self.num_experts
        )
        expected = self._expected_update(pid)
        record = content.array_records[keys.ARRAYS]
        unexpected = set(record) - expected if self.sync is None else set()
        if unexpected:
            raise InvalidUpdate(f"{len(unexpected)} unexpected parameter(s), e.g. {sorted(unexpected)[:3]}")
        if self.sync is None:
            update = decode(record, {n: self.params[n] for n in expected})
        else:
            update = self._reconstruct(pid, record, expected)
        validate_update(update, expected, self.params, self.cfg.max_abs_value, self.cfg.max_update_ratio)
        metrics["bytes_up"] = payload_bytes(record)
        metrics["wire_bytes_up"] = wire_bytes(record)
        return update, metrics

    def _reconstruct(self, pid: int, record: ArrayRecord, expected: set[str]) -> dict[str, torch.Tensor]:
        """The node's trained tensors: the copy it was sent plus its decoded difference."""
        shadow = self.sync.shadow
        unexpected = {k.partition("#")[0] for k in record} - expected
        if unexpected:
            raise InvalidUpdate(f"{len(unexpected)} unexpected parameter(s), e.g. {sorted(unexpected)[:3]}")
        whole, deltas = decode_sync(record, {n: shadow[n] for n in expected}, self.cfg.uplink)
        if whole:
            raise InvalidUpdate(f"whole tensors in a delta-sync reply, e.g. {sorted(whole)[:3]}")
        own = set(expert_param_names(list(self.params), self.experts_of(pid)))
        self._own_uplinks[pid] = {n: {k: record[k] for k in record if k.partition("#")[0] == n} for n in own & set(deltas)}
        return {n: apply(shadow[n], d) for n, d in deltas.items()}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # bytes_*: tensor payload as encoded; wire_bytes_*: the serialised arrays, headers included.
        nodes: dict[int, dict[str, Any]] = {
            p: {"partition_id": p, "bytes_down": self._sent.get(p, 0), "bytes_up": 0,
                "wire_bytes_down": self._wire_sent.get(p, 0), "wire_bytes_up": 0, "status": "no reply"}
            for p in self.partitions
        }
        updates: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        for msg in replies:
            pid = self._sender(msg)
            if pid is None:
                log.warning("round %d: reply not matching any message of this round dropped (from node %s)",
                            server_round, msg.metadata.src_node_id)
                continue
            if nodes[pid]["status"] != "no reply":
                log.warning("round %d: second reply of partition %d rejected", server_round, pid)
                nodes[pid]["status"] = "rejected: duplicate reply"
                updates.pop(pid, None)
                continue
            if msg.has_error():
                nodes[pid]["status"] = f"error: {msg.error.reason}"
                log.warning("round %d: partition %d failed: %s", server_round, pid, msg.error.reason)
                continue
            try:
                update, metrics = self._check_reply(pid, msg)
            except (InvalidUpdate, DecodeError, KeyError, TypeError, ValueError) as exc:
                nodes[pid]["status"] = f"rejected: {exc}"
                log.warning("round %d: update of partition %d rejected: %s", server_round, pid, exc)
                continue
            nodes[pid].update(metrics)
            nodes[pid]["status"] = "ok"
            weight = metrics["num_tokens"] if self.cfg.shared_weighting == "tokens" else 1.0
            updates[pid] = (update, weight)

        quorum = self.cfg.quorum(len(self.partitions))
        alpha, applied, refused = 0.0, False, ""
        prev_step = self.global_step
        if len(updates) >= min(quorum, len(self.partitions)) and updates:
            snapshot, buffers = self.params, {k: v.clone() for k, v in self.outer.buffers.items()}
            new = aggregate(self.params, updates, self._trainers, self.outer, self.cfg.trim_fraction)
            step = prev_step + self.cfg.local_steps
            if self.cfg.merge.due(prev_step, step):
                alpha = self.cfg.merge.alpha(step)
                new.update(merge_experts(new, alpha, self.cfg.merge.top_k))
            bad = next((n for n, t in new.items() if not all_finite(t)), None)
            if bad is not None:
                refused = f"the new global {bad} would hold NaN or Inf"
                self.params, self.outer.buffers, alpha = snapshot, buffers, 0.0
                log.error("round %d refused: %s; global model unchanged", server_round, refused)
            else:
                self.params, self.global_step, applied = new, step, True
        else:
            refused = f"{len(updates)} valid update(s), quorum {quorum}"
            log.warning("round %d below quorum (%s); global model unchanged", server_round, refused)
        self.failed_rounds = 0 if applied else self.failed_rounds + 1

        if self.sync is not None:
            for pid in self.partitions:
                self.sync.commit(pid, pid in updates, prev_step + self.cfg.local_steps, self._own_uplinks.get(pid))
        self._update_membership(updates, alpha, applied)
        routing = self._update_routing(nodes, updates)
        reconsider_owners(self, nodes)  # strategy.assignment_policy: owners from measured load or speed
        tokens = sum(n.get("num_tokens", 0.0) for p, n in nodes.items() if p in updates)
        loss = sum(n.get("train_loss", 0.0) * n.get("num_tokens", 0.0) for p, n in nodes.items() if p in updates)
        record = {
            "round": server_round,
            "global_step": self.global_step,
            "merge_alpha": alpha,
            "applied": applied,
            "refused": refused,
            "valid_updates": len(updates),
            "tokens": tokens if applied else 0.0,
            "train_loss": loss / tokens if tokens else float("nan"),
            "bytes_up": sum(n["bytes_up"] for n in nodes.values()),
            "bytes_down": sum(n["bytes_down"] for n in nodes.values()),
            "wire_bytes_up": sum(n["wire_bytes_up"] for n in nodes.values()),
            "wire_bytes_down": sum(n["wire_bytes_down"] for n in nodes.values()),
            "nodes": {str(p): n for p, n in nodes.items()},
            "owners": {str(p): list(e) for p, e in self.owners.items()},
            **routing,
        }
        self.history.append(record)
        metrics = MetricRecord(
            {k: float(record[k]) for k in ("global_step", "merge_alpha", "tokens", "bytes_up", "bytes_down")}
        )
        return encode(self.params), metrics

    def _update_membership(self, updates: Mapping[int, Any], alpha: float, applied: bool) -> None:
        exclusive_copy = self.outer.is_plain_average
        for pid in self.partitions:
            member = self.members[pid]
            if pid in updates:
                member.absent = 0
                own_exclusive = all(self._num_owners(e) == 1 for e in self.experts_of(pid))
                # With delta sync the versions decide what a node needs; without, a node's own
                # experts may be skipped only while its copy is the global value.
                member.needs_full = self.sync is None and (
                    not applied or alpha > 0 or not (exclusive_copy and own_exclusive))
            else:
                member.absent += 1
                member.needs_full = True
        gone = [p for p in self.partitions if self.cfg.reassign_after and self.members[p].absent >= self.cfg.reassign_after]
        if gone and len(gone) < len(self.partitions):
            for pid in gone:
                self.members[pid].active = False
                self.events.append({"round": self.round, "event": "leave", "partition": pid})
            self._reassign(f"partition(s) {gone} without a valid update for {self.cfg.reassign_after} rounds")

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid | None
    ) -> Iterable[Message]:
        every = self.cfg.federated_eval_every
        if not (server_round == self.num_rounds or (every and server_round % every == 0)):
            return []
        messages = []
        self._eval_sent, self._targets = {}, {}
        for pid in self.partitions:
            config_rec = ConfigRecord({**dict(config), keys.SERVER_ROUND: server_round, keys.NODE_INDEX: pid,
                                       **({keys.ROUTER_BIAS: self._routing_config()[keys.ROUTER_BIAS]}
                                          if self.router_bias is not None else {})})
            content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config_rec})
            self._eval_sent[pid] = payload_bytes(arrays)
            messages.append(
                Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=self.members[pid].node_id)
            )
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        total, tokens, seen = 0.0, 0.0, set()
        for msg in replies:
            pid = self._sender(msg)
            if pid is None or pid in seen:
                log.warning("evaluation reply dropped (unknown or duplicate sender %s)", msg.metadata.src_node_id)
                continue
            seen.add(pid)
            if msg.has_error():
                log.warning("evaluation failed on partition %d: %s", pid, msg.error.reason)
                continue
            try:
                if keys.METRICS not in msg.content.metric_records:
                    raise InvalidUpdate("no metrics record")
                loss, n = validate_eval_metrics(msg.content.metric_records[keys.METRICS], self.max_eval_tokens)
            except (InvalidUpdate, TypeError, ValueError) as exc:
                log.warning("evaluation reply of partition %d rejected: %s", pid, exc)
                continue
            total += loss * n
            tokens += n
        if not tokens:
            return None
        result = {"federated_eval_loss": total / tokens, "eval_bytes_down": float(sum(self._eval_sent.values()))}
        if self.history and self.history[-1]["round"] == server_round:
            self.history[-1].update(result)
        return MetricRecord(result)

    def summary(self) -> None:
        log.info(
            "SPES: %d nodes (partitions %s), experts per node %s, H=%d, outer lr=%g momentum=%g, merge %s",
            len(self.partitions), self.partitions, [len(self.owners[p]) for p in self.partitions],
            self.cfg.local_steps, self.cfg.outer_lr, self.cfg.outer_momentum, asdict(self.cfg.merge),
        )

    # -- state to continue a run ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; the outer optimizer's momentum tensors are in `outer_buffers()`."""
        return {
            "round": self.round,
            "global_step": self.global_step,
            "failed_rounds": self.failed_rounds,
            "members": {str(p): {"active": m.active, "absent": m.absent} for p, m in self.members.items()},
            "owners": {str(p): list(e) for p, e in self.owners.items()},
            "events": self.events,
            "config": asdict(self.cfg),
            "global_load": self.global_load,
            "router_bias": self.router_bias,
            **({} if self.sync is None else {"downlink": self.sync.state_dict()}),
        }

    def outer_buffers(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep: outer momentum and, with delta sync, the nodes' copy of
        the model (`SHADOW` + name; the gap to the model is the downlink's error feedback)."""
        out = dict(self.outer.buffers)
        if self.sync is not None:
            out.update({SHADOW + k: v for k, v in self.sync.tensors().items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any], buffers: Mapping[str, torch.Tensor] | None = None) -> None:
        """Continue from a saved state; members not connected now stay inactive until they return."""
        self.round = int(state["round"])
        self.global_step = int(state["global_step"])
        self.failed_rounds = int(state.get("failed_rounds", 0))
        self.events = list(state.get("events", []))
        self.global_load = state.get("global_load")
        self.router_bias = state.get("router_bias") if self.cfg.router_bias_rate > 0 else None
        connected = dict(self.members)
        self.members = {}
        for key, m in state["members"].items():
            pid = int(key)
            now = connected.get(pid)
            self.members[pid] = Member(pid, now.node_id if now else -1, active=bool(m["active"]) and now is not None,
                                       absent=int(m["absent"]))
        for pid, member in connected.items():
            if pid not in self.members:
                self.members[pid] = member
        self.owners = {int(p): tuple(int(e) for e in experts) for p, experts in state["owners"].items()
                       if self.members.get(int(p)) and self.members[int(p)].active}
        Ownership(self.num_experts, tuple(self.owners.get(p, ()) for p in self.partitions))
        buffers = dict(buffers or {})
        shadow = {k[len(SHADOW):]: buffers.pop(k) for k in list(buffers) if k.startswith(SHADOW)}
        self.outer.buffers = {k: v.clone() for k, v in buffers.items()}
        if self.sync is not None:
            self.sync.load(state.get("downlink", {}), shadow)
        for member in self.members.values():
            member.needs_full = True  # nodes may have lost their state meanwhile
        if set(self.partitions) != set(self.owners) or any(
            not any(e in o for o in self.owners.values()) for e in range(self.num_experts)
        ):
            self._reassign("resumed with different nodes")
