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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import keys
from common.codec import DecodeError, decode, encode, payload_bytes, wire_bytes
from common.spec import MergeSchedule, StrategyConfig
from model.naming import expert_param_names, fragment_of, parse_expert_param, synced_fragment, trained_param_names
from strategy.acceptance import Outcome, accept_round
from strategy.assignment import Ownership, make_assignment, rank_partitions, rebalance
from strategy.federated_eval import FederatedEvaluation
from strategy.federation_load import FederationLoad
from strategy.load_aware import propose_owners
from strategy.membership import Member, Membership
from strategy.outer import OuterOptimizer
from strategy.residency import Residency, absent_share, flat_mask, mark_absent, resident_names, without_experts
from strategy.round_record import RoundRecord
from strategy.validation import InvalidUpdate, validate_train_metrics, validate_update
from strategy.versions import VersionedDownlink

log = logging.getLogger("spes.strategy")

SHADOW = "downlink-shadow/"  # checkpoint tensor prefix of the nodes' copy of the model (delta sync)
__all__ = ["MergeSchedule", "SpesStrategy", "StrategyConfig"]


class SpesStrategy(FederatedEvaluation, Strategy):
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
        self.membership = Membership(node_partitions)
        initial = make_assignment(cfg.assignment, num_experts, len(pids))
        self.owners: dict[int, tuple[int, ...]] = dict(zip(sorted(pids), initial.owners))
        self.outer = OuterOptimizer(cfg.outer_lr, cfg.outer_momentum, cfg.nesterov)
        self.num_rounds = num_rounds
        self.params: dict[str, torch.Tensor] = {}
        self.round = 0
        self.global_step = 0
        self.failed_rounds = 0  # in a row, below quorum
        self.history: list[RoundRecord] = []  # the rounds aggregated by this process
        self.events: list[dict[str, Any]] = []  # joins, departures, reassignments
        self._sent: dict[int, int] = {}  # pid -> bytes sent this round
        self._targets: dict[str, int] = {}  # message id -> pid, this round
        self._eval_sent: dict[int, int] = {}
        self._wire_sent: dict[int, int] = {}
        # Delta sync: the nodes' copy of the model and what each node holds (None: whole fp32 tensors).
        self.sync = VersionedDownlink(cfg.downlink, cfg.uplink) if cfg.delta_sync else None
        self._own_uplinks: dict[int, dict[str, dict]] = {}  # pid -> owned expert -> its uplink Arrays
        self.balance = FederationLoad(cfg.router_bias_rate)  # balancing across nodes
        self.residency = Residency(cfg.residency, num_experts, cfg.assignment_every)  # who holds which experts
        # The acceptance test (strategy/guard.py): guard loss of a candidate model, set by the coordinator.
        self.guard_score: Callable[[Mapping[str, torch.Tensor]], float] | None = None
        self.guard_losses: list[float] = []  # of the accepted models, the last window + 1

    # -- membership ------------------------------------------------------------------------
    @property
    def global_load(self) -> list[list[float]] | None:
        """The federation's expert load of the last round, [layers][experts] token shares."""
        return self.balance.load

    @property
    def router_bias(self) -> list[list[float]] | None:
        """The routing bias nodes add for the top-k choice (None unless router_bias_rate > 0)."""
        return self.balance.bias

    @property
    def members(self) -> dict[int, Member]:
        return self.membership.members

    @property
    def partitions(self) -> list[int]:
        return self.membership.active

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

    def add_node(self, node_id: int, pid: int, residency: str | None = None) -> None:
        """A node joined (or came back, possibly under a new Flower node id), asking for its own
        `residency` or not (None: the run's strategy.residency)."""
        event = self.membership.join(node_id, pid)
        self.events.append({"round": self.round, "event": event, "partition": pid})
        self.residency.ask(pid, residency)
        self._reassign(f"partition {pid} joined")

    def initialize(self, params: Mapping[str, torch.Tensor]) -> None:
        """The global model the run starts (or resumes) from, copied."""
        self.params = {k: v.detach().clone() for k, v in params.items()}

    # -- names -------------------------------------------------------------------------------
    def _expected_update(self, pid: int) -> set[str]:
        names = list(self.params)
        return {n for n in trained_param_names(names, self.experts_of(pid), self.lora) if self._synced(n)}

    def _synced(self, name: str) -> bool:
        """Whether this round syncs `name` (streaming fragments: one fragment a round, in turn)."""
        f = self.cfg.fragments
        return f == 1 or fragment_of(name, f) == synced_fragment(self.round, f)

    def _absent(self, pid: int) -> list[list[int]] | None:
        return self.residency.absent(pid)

    def _layers(self) -> int:
        return self.num_layers or max((e.layer for n in self.params if (e := parse_expert_param(n))), default=0) + 1

    def _choose_residency(self, server_round: int) -> None:
        """strategy.residency: the experts each node holds this round; a node whose set changed is resynced."""
        last = self.history[-1].nodes if self.history else {}
        loads = {p: n["expert_load"] for p in self.partitions if "expert_load" in (n := last.get(str(p), {}))}
        owners = {p: self.experts_of(p) for p in self.partitions}
        for pid, held in self.residency.update(server_round, owners, loads, self.global_load, self._layers()).items():
            self.members[pid].needs_full = True
            self.events.append({"round": server_round, "event": "residency", "partition": pid, "experts": held})

    def _downlink(self, pid: int, full: bool) -> tuple[ArrayRecord, dict[str, Any]]:
        """The arrays a node gets (what it holds: strategy/residency.py) and their delta-sync keys."""
        holds = resident_names(self.params, self._absent(pid))
        if self.sync is not None:
            record, base_step, apply_own = self.sync.message(pid, full, set(holds))
            return record, {keys.BASE_STEP: base_step, keys.APPLY_OWN: apply_own}
        # Without delta sync a node keeps its own experts: they come down only in a full message.
        return encode(self.params, without_experts(holds, () if full else self.experts_of(pid))), {}

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
        self._choose_residency(server_round)
        for pid in self.partitions:
            member = self.members[pid]
            record, sync_cfg = self._downlink(pid, member.needs_full)
            if (absent := self._absent(pid)) is not None:
                sync_cfg[keys.ABSENT_EXPERTS] = flat_mask(absent, self.num_experts)
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
                    **({keys.SYNC_FRAGMENT: synced_fragment(server_round, f)} if (f := self.cfg.fragments) > 1 else {}),
                    **self.balance.train_config(),
                }
            )
            content = RecordDict({keys.ARRAYS: record, keys.CONFIG: node_cfg})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=member.node_id))
        return messages

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
        return self.membership.partition_of(msg.metadata.src_node_id)

    def _check_reply(self, pid: int, msg: Message) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        content = msg.content
        if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
            raise InvalidUpdate("reply needs an ArrayRecord 'arrays' and a MetricRecord 'metrics'")
        metrics = validate_train_metrics(
            content.metric_records[keys.METRICS], self.max_tokens, self._layers(), self.num_experts
        )
        metrics.update(absent_share(metrics.get("expert_load"), self._absent(pid)))
        expected = self._expected_update(pid)
        record = content.array_records[keys.ARRAYS]
        unexpected = set(record) - expected if self.sync is None else set()
        if unexpected:
            raise InvalidUpdate(f"{len(unexpected)} unexpected parameter(s), e.g. {sorted(unexpected)[:3]}")
        if self.sync is None:
            update = decode(record, {n: self.params[n] for n in expected})
        else:
            own = set(expert_param_names(list(self.params), self.experts_of(pid)))
            update, self._own_uplinks[pid] = self.sync.reconstruct(record, expected, own)
        validate_update(update, expected, self.params, self.cfg.max_abs_value, self.cfg.max_update_ratio)
        metrics["bytes_up"] = payload_bytes(record)
        metrics["wire_bytes_up"] = wire_bytes(record)
        return update, metrics

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, apply the valid ones if they make a quorum, then update what follows from
        the round: the delta-sync versions, membership, the routing load and bias, ownership."""
        nodes, updates = self._collect_replies(server_round, replies)
        prev_step = self.global_step
        outcome = self._apply_updates(server_round, updates)
        alpha, refused, applied = outcome.alpha, outcome.refused, not outcome.refused
        for pid, scale in outcome.scale.items():
            nodes[pid].update({f"{kind}_update_scale": v for kind, v in scale.items()})
            nodes[pid]["clipped_tensors"] = outcome.clipped.get(pid, 0)
        for pid, cosine in outcome.cosine.items():
            nodes[pid]["shared_update_cosine"] = cosine
        for pid, why in outcome.dropped.items():
            nodes[pid]["status"] = why
            updates.pop(pid)
        quarantined = self.membership.strike(outcome.dropped, self.cfg.guard.strikes)
        self.failed_rounds = 0 if applied else self.failed_rounds + 1
        if self.sync is not None:
            for pid in self.partitions:
                self.sync.commit(pid, pid in updates, prev_step + self.cfg.local_steps, self._own_uplinks.get(pid))
        self._update_membership(updates, alpha, applied)
        self._quarantine(quarantined)
        routing = self.balance.update(
            [
                (mark_absent(nodes[p]["expert_load"], self._absent(p)), nodes[p]["num_tokens"])
                for p in updates
                if "expert_load" in nodes[p]
            ]
        )
        self._reconsider_owners(nodes)
        record = RoundRecord.of_round(
            server_round,
            self.global_step,
            nodes,
            set(updates),
            merge_alpha=alpha,
            applied=applied,
            refused=refused,
            owners={str(p): list(e) for p, e in self.owners.items()},
            fragment=synced_fragment(server_round, self.cfg.fragments) if self.cfg.fragments > 1 else None,
            guard=None if outcome.verdict is None else outcome.verdict.summary(),
            **routing,
        )
        self.history.append(record)
        metrics = {
            k: float(getattr(record, k)) for k in ("global_step", "merge_alpha", "tokens", "bytes_up", "bytes_down")
        }
        return encode(self.params), MetricRecord(metrics)

    def _collect_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[dict[int, dict[str, Any]], dict[int, tuple[dict[str, torch.Tensor], float]]]:
        """(partition -> what the round records of it, partition -> (checked update, weight)).

        A reply is matched to the message it answers; a second reply of a partition voids both, an
        error reply or one that fails a check is recorded with its reason and never used."""
        # bytes_*: tensor payload as encoded; wire_bytes_*: the serialised arrays, headers included.
        nodes: dict[int, dict[str, Any]] = {
            p: {
                "partition_id": p,
                "bytes_down": self._sent.get(p, 0),
                "bytes_up": 0,
                "wire_bytes_down": self._wire_sent.get(p, 0),
                "wire_bytes_up": 0,
                "status": "no reply",
            }
            for p in self.partitions
        }
        updates: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        for msg in replies:
            pid = self._sender(msg)
            if pid is None:
                log.warning(
                    "round %d: reply not matching any message of this round dropped (from node %s)",
                    server_round,
                    msg.metadata.src_node_id,
                )
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
            nodes[pid].update(metrics, status="ok")
            updates[pid] = (update, metrics["num_tokens"] if self.cfg.shared_weighting == "tokens" else 1.0)
        return nodes, updates

    def _apply_updates(self, server_round: int, updates: Mapping[int, Any]) -> Outcome:
        """The round's outcome (strategy/acceptance.py); the model, step and momentum change only if applied."""
        quorum = min(self.cfg.quorum(len(self.partitions)), len(self.partitions))
        guard = None
        if self.guard_score is not None and self.cfg.guard.enabled:
            if not self.guard_losses:
                self.guard_losses = [self.guard_score(self.params)]
            guard = (self.guard_score, self.guard_losses)
        outcome = accept_round(
            self.params, updates, self._trainers, self.outer, self.cfg, self.global_step, quorum, guard, self._synced
        )
        for pid, why in outcome.dropped.items():
            log.warning("round %d: update of partition %d %s", server_round, pid, why)
        if outcome.refused:
            log.error("round %d refused: %s; global model unchanged", server_round, outcome.refused)
            return outcome
        self.params, self.global_step = outcome.params, outcome.step
        if outcome.verdict is not None:
            self.guard_losses = [*self.guard_losses, outcome.verdict.loss][-(self.cfg.guard.window + 1) :]
        return outcome

    def _reconsider_owners(self, nodes: Mapping[int, Mapping[str, Any]]) -> None:
        """strategy.assignment_policy: owners from the measured load or speed of the last rounds."""
        every = self.cfg.assignment_every
        window = [r.nodes for r in self.history[max(0, len(self.history) - (every - 1)) :]] if every > 1 else []
        active = {p: self.owners[p] for p in self.partitions}
        proposal = propose_owners(
            self.cfg, self.round, [*window, {str(p): n for p, n in nodes.items()}], active, self.num_experts
        )
        if proposal is not None:
            new, reason, extra = proposal
            self.set_owners({**self.owners, **new}, reason, **extra)

    def _update_membership(self, updates: Mapping[int, Any], alpha: float, applied: bool) -> None:
        exclusive_copy = self.outer.is_plain_average

        def needs_full(pid: int) -> bool:
            # With delta sync the versions decide what a node needs; without, a node's own experts
            # may be skipped only while its copy is the global value.
            own_exclusive = all(self._num_owners(e) == 1 for e in self.experts_of(pid))
            return self.sync is None and (not applied or alpha > 0 or not (exclusive_copy and own_exclusive))

        self.membership.record_round(set(updates), needs_full)
        gone = self.membership.absent_for(self.cfg.reassign_after)
        if gone and len(gone) < len(self.partitions):
            self.membership.deactivate(gone)
            self.events += [{"round": self.round, "event": "leave", "partition": pid} for pid in gone]
            self._reassign(f"partition(s) {gone} without a valid update for {self.cfg.reassign_after} rounds")

    def _quarantine(self, pids: list[int]) -> None:
        """Nodes with `guard.strikes` dropped updates: out of the run for good, their experts to the others."""
        if not pids or len(pids) >= len(self.partitions):
            return
        self.membership.deactivate(pids)
        self.events += [{"round": self.round, "event": "quarantine", "partition": p} for p in pids]
        log.error(
            "round %d: partition(s) %s quarantined after %d dropped updates", self.round, pids, self.cfg.guard.strikes
        )
        self._reassign(f"partition(s) {pids} quarantined by the guard")

    def summary(self) -> None:
        """Flower's Strategy API: log the configuration."""
        log.info(
            "SPES: partitions %s, experts per node %s, %s",
            self.partitions,
            [len(self.owners[p]) for p in self.partitions],
            asdict(self.cfg),
        )

    # -- state to continue a run ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; the outer optimizer's momentum tensors are in `outer_buffers()`."""
        return {
            "round": self.round,
            "global_step": self.global_step,
            "failed_rounds": self.failed_rounds,
            "members": self.membership.state_dict(),
            "owners": {str(p): list(e) for p, e in self.owners.items()},
            "events": self.events,
            "guard_losses": self.guard_losses,
            "config": asdict(self.cfg),
            "residency": self.residency.state_dict(),
            **self.balance.state_dict(),
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
        """Continue from a saved state; members not connected now stay inactive until they return.
        `history` starts empty: it holds the rounds this process aggregated."""
        self.history = []
        self.round = int(state["round"])
        self.global_step = int(state["global_step"])
        self.failed_rounds = int(state.get("failed_rounds", 0))
        self.events = list(state.get("events", []))
        self.guard_losses = [float(x) for x in state.get("guard_losses", [])]
        self.balance.load_state_dict(state)
        self.residency.load_state_dict(state.get("residency", {}))
        self.membership.load_state_dict(state["members"])
        self.owners = {
            int(p): tuple(int(e) for e in experts)
            for p, experts in state["owners"].items()
            if self.members.get(int(p)) and self.members[int(p)].active
        }
        # The saved owners may leave experts orphaned (reassigned below), never name one the model lacks.
        Ownership(self.num_experts, tuple(self.owners[p] for p in sorted(self.owners))).check_range()
        buffers = dict(buffers or {})
        shadow = {k[len(SHADOW) :]: buffers.pop(k) for k in list(buffers) if k.startswith(SHADOW)}
        self.outer.buffers = {k: v.clone() for k, v in buffers.items()}
        if self.sync is not None:
            self.sync.load(state.get("downlink", {}), shadow)
        if set(self.partitions) != set(self.owners) or any(
            not any(e in o for o in self.owners.values()) for e in range(self.num_experts)
        ):
            self._reassign("resumed with different nodes")
