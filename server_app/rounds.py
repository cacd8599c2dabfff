"""The coordinator's round loop: push, collect until every node replied or the deadline, aggregate.

Flower's `Strategy.start` waits for every reply of a round (or a timeout, silently) and knows
nothing of nodes that join or replies that arrive a round late. This loop closes a round
when every targeted node replied or `strategy.round_timeout_s` passed, drops (and logs) late
replies to earlier rounds, lets nodes join between rounds, and stops the run after
`strategy.max_failed_rounds` rounds in a row below quorum.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.strategy_checks import RESIDENCY
from strategy.spes import SpesStrategy

log = logging.getLogger("spes.server")
POLL_S = 0.2


class RunFailed(RuntimeError):
    """The run cannot go on; the message names the nodes and why."""


class Collector:
    """Sends a round's messages and gathers the replies; remembers unanswered ones to drop later."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self._stale: set[str] = set()

    def _drop_late(self) -> None:
        if not self._stale:
            return
        for msg in self.grid.pull_messages(list(self._stale)):
            self._stale.discard(msg.metadata.reply_to_message_id)
            log.warning("late reply from node %s to an earlier round dropped", msg.metadata.src_node_id)

    def exchange(
        self,
        messages: list[Message],
        timeout_s: float,
        on_sent: Callable[[list[str], list[Message]], None] | None = None,
    ) -> list[Message]:
        if not messages:
            return []
        ids = list(self.grid.push_messages(messages))
        if on_sent is not None:
            on_sent(ids, messages)
        pending = {i for i in ids if i}
        replies: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            self._drop_late()
            got = list(self.grid.pull_messages(list(pending)))
            for msg in got:
                if msg.metadata.reply_to_message_id in pending:
                    pending.discard(msg.metadata.reply_to_message_id)
                    replies.append(msg)
            if pending and not got:
                time.sleep(POLL_S)
        if pending:
            log.warning("%d node(s) did not reply within %.0fs", len(pending), timeout_s)
            self._stale |= pending
        return replies


@dataclass
class SetupReplies:
    """What the nodes answered to the setup query, by Flower node id."""

    partitions: dict[int, int]
    num_partitions: dict[int, int]
    hardware: dict[int, dict]  # node_hardware()
    residency: dict[int, str]  # the nodes that ask to hold fewer (or more) experts than strategy.residency
    errors: list[str]


_HARDWARE_FIELDS = tuple(keys.NODE_HARDWARE_KEYS.values())


def node_hardware(raw: object) -> dict:
    """A node's own account of how it trains (setup reply), kept to plain known fields: it is shown
    in the report, never acted on. Missing or malformed: {}."""
    try:
        data = json.loads(raw) if isinstance(raw, str) and len(raw) < 4096 else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out = {k: data[k] for k in _HARDWARE_FIELDS if isinstance(data.get(k), (str, int, float, bool))}
    by_node = data.get("set-by-node")
    if isinstance(by_node, list) and all(isinstance(k, str) and len(k) < 64 for k in by_node):
        out["set-by-node"] = by_node[: len(_HARDWARE_FIELDS)]
    return out


def setup_nodes(
    grid: Grid,
    node_ids: Iterable[int],
    setup: ConfigRecord,
    collector: Collector,
    timeout_s: float,
    num_partitions: int | None = None,
) -> SetupReplies:
    """Send the run setup; the partition id, num-partitions and hardware of each node that answered
    well, and the errors. With `num_partitions`, a node that shards the data otherwise is an error."""
    messages = [
        Message(RecordDict({keys.CONFIG: setup}), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids
    ]
    sent: dict[str, int] = {}
    replies = collector.exchange(
        messages, timeout_s, lambda ids, msgs: sent.update({i: m.metadata.dst_node_id for i, m in zip(ids, msgs) if i})
    )
    partitions: dict[int, int] = {}  # node id -> ...
    counts: dict[int, int] = {}
    hardware: dict[int, dict] = {}
    residency: dict[int, str] = {}
    errors: list[str] = []
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            errors.append(f"node {node}: {reply.error.reason}")
            continue
        try:
            cfg = reply.content.config_records[keys.CONFIG]
            pid, parts = cfg[keys.PARTITION_ID], cfg[keys.NUM_PARTITIONS]
            for value in (pid, parts):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"partition id {pid!r} of {parts!r}")
            ask = cfg.get(keys.RESIDENCY_ASK)
            if ask is not None and (not isinstance(ask, str) or RESIDENCY.match(ask) is None):
                raise ValueError(f"residency {ask!r}")
        except (KeyError, ValueError) as exc:
            errors.append(f"node {node}: malformed setup reply ({exc})")
            continue
        if num_partitions is not None and parts != num_partitions:
            errors.append(
                f"node {node}: num-partitions={parts}, but this run's nodes share the data in {num_partitions} "
                f"partitions; restart it with num-partitions={num_partitions} and a free partition-id below it"
            )
            continue
        partitions[node], counts[node] = pid, parts
        hardware[node] = node_hardware(cfg.get(keys.NODE_HARDWARE))
        if ask is not None:
            residency[node] = ask
    return SetupReplies(partitions, counts, hardware, residency, errors)


def discover(
    grid: Grid, wanted: int, setup: ConfigRecord, collector: Collector, timeout_s: float
) -> tuple[dict[int, int], int, dict[int, dict], dict[int, str]]:
    """Wait for `wanted` SuperNodes, set them up; (node id -> partition id, the federation's
    num-partitions, partition id -> the node's hardware, partition id -> the residency it asks for
    where it asks). The lowest partition ids win; the chosen nodes must agree on num-partitions."""
    deadline = time.monotonic() + timeout_s
    while len(node_ids := list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise RunFailed(f"waited {timeout_s:.0f}s for {wanted} SuperNodes, {len(node_ids)} connected")
        time.sleep(0.5)
    replies = setup_nodes(grid, node_ids, setup, collector, timeout_s)
    partitions, counts = replies.partitions, replies.num_partitions
    if replies.errors:
        raise RunFailed("node setup failed: " + "; ".join(replies.errors))
    if len(partitions) < wanted:
        raise RunFailed(f"only {len(partitions)} of {wanted} nodes answered the setup query")
    chosen = sorted(partitions, key=lambda n: partitions[n])[:wanted]
    pids = [partitions[n] for n in chosen]
    if len(set(pids)) != len(pids):
        raise RunFailed(f"two SuperNodes share a partition id: {sorted(pids)}")
    if len({counts[n] for n in chosen}) > 1:
        said = ", ".join(f"partition {partitions[n]}: {counts[n]}" for n in chosen)
        raise RunFailed(f"the SuperNodes disagree on num-partitions ({said}): start them all with one value")
    idle = sorted(set(partitions) - set(chosen))
    if idle:
        log.warning("%d extra SuperNode(s) stay idle: partitions %s", len(idle), [partitions[n] for n in idle])
    asks = {partitions[n]: replies.residency[n] for n in chosen if n in replies.residency}
    hardware = {partitions[n]: replies.hardware[n] for n in chosen}
    return {n: partitions[n] for n in chosen}, counts[chosen[0]], hardware, asks


def admit_new_nodes(
    grid: Grid,
    strategy: SpesStrategy,
    setup: ConfigRecord,
    collector: Collector,
    known: set[int],
    timeout_s: float,
    num_partitions: int | None = None,
) -> dict[int, dict]:
    """Set up SuperNodes that connected since the last round and give them an assignment (only
    those sharding the data in the run's `num_partitions`); partition id -> hardware of those admitted."""
    new = [n for n in grid.get_node_ids() if n not in known]
    if not new:
        return {}
    known.update(new)
    replies = setup_nodes(grid, new, setup, collector, timeout_s, num_partitions)
    partitions, errors, admitted = replies.partitions, replies.errors, {}
    for e in errors:
        log.warning("new node not admitted: %s", e)
    for node_id, pid in sorted(partitions.items(), key=lambda kv: kv[1]):
        member = strategy.members.get(pid)
        if member is not None and member.quarantined:
            log.warning("node %s claims partition %d, quarantined by the guard; refused", node_id, pid)
            continue
        held = member is not None and member.active and member.node_id != node_id
        if held and member.node_id in set(grid.get_node_ids()):
            log.warning(
                "node %s claims partition %d, already held by live node %s; ignored", node_id, pid, member.node_id
            )
            continue
        log.warning("partition %d (node %s) joins at round %d", pid, node_id, strategy.round + 1)
        strategy.add_node(node_id, pid, replies.residency.get(node_id))
        admitted[pid] = replies.hardware[node_id]
    return admitted


def release_nodes(
    grid: Grid, partitions: dict[int, int], token: str, collector: Collector, timeout_s: float
) -> list[str]:
    """Tell each node (node id -> partition id) that the run completed, so that it removes or keeps
    its run folder (client_app/run_end.py); one line per partition on what it did. Never raises:
    the run's outputs are written by now, and a node that does not answer keeps its folder."""
    finish = ConfigRecord({keys.RUN_TOKEN: token})
    kind = f"{MessageType.QUERY}.{keys.FINISH}"
    messages = [Message(RecordDict({keys.CONFIG: finish}), message_type=kind, dst_node_id=n) for n in partitions]
    lines = {}
    try:
        replies = collector.exchange(messages, timeout_s)
    except Exception as exc:  # the Grid's transport failing at the very end must not fail a completed run
        log.warning("finish messages not delivered: %s", exc)
        replies = []
    for reply in replies:
        pid = partitions.get(reply.metadata.src_node_id, reply.metadata.src_node_id)
        cfg = None if reply.has_error() else reply.content.config_records.get(keys.CONFIG)
        size = None if cfg is None else cfg.get(keys.STATE_BYTES)
        if cfg is None or not isinstance(size, int) or not isinstance(cfg.get(keys.STATE_KEPT), bool):
            why = reply.error.reason if reply.has_error() else "a malformed reply"
            lines[pid] = f"partition {pid}: did not release its run folder ({why})"
            continue
        verb = "kept its run folder (keep-state)" if cfg[keys.STATE_KEPT] else "removed its run folder"
        lines[pid] = f"partition {pid}: {verb}, {size / 2**20:.1f} MiB"
    silent = sorted(set(partitions.values()) - set(lines))
    lines.update({pid: f"partition {pid}: no answer, its run folder stays" for pid in silent})
    return [lines[pid] for pid in sorted(lines)]
