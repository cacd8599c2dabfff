"""The nodes' own evaluation of the global model: each scores it on its held-out shard, the coordinator
takes the token-weighted mean of the replies that pass the checks (strategy/validation.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.codec import encode, payload_bytes
from strategy.residency import flat_mask, resident_names
from strategy.validation import InvalidUpdate, validate_eval_metrics

log = logging.getLogger("spes.strategy")


def federated_loss(
    replies: Iterable[Message], sender: Callable[[Message], int | None], max_tokens: float
) -> tuple[float, float] | None:
    """(token-weighted mean held-out loss, tokens) over the valid replies; None when there are none.

    A reply from an unknown sender or a second reply of a partition is dropped; an error reply or
    one with malformed or out-of-range metrics is logged and left out."""
    total, tokens, seen = 0.0, 0.0, set()
    for msg in replies:
        pid = sender(msg)
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
            loss, n = validate_eval_metrics(msg.content.metric_records[keys.METRICS], max_tokens)
        except (InvalidUpdate, TypeError, ValueError) as exc:
            log.warning("evaluation reply of partition %d rejected: %s", pid, exc)
            continue
        total += loss * n
        tokens += n
    return (total / tokens, tokens) if tokens else None


class FederatedEvaluation:
    """The evaluate side of SpesStrategy (Flower's Strategy API): who evaluates when, and the
    federation's loss from the replies. Uses the strategy's cfg, members, partitions, balance,
    history and reply matching (`_sender`)."""

    def federated_eval_due(self, server_round: int) -> bool:
        """The nodes evaluate the global model on their held-out shards in the last round and every
        `federated_eval_every` rounds."""
        every = self.cfg.federated_eval_every
        return server_round == self.num_rounds or bool(every and server_round % every == 0)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid | None
    ) -> Iterable[Message]:
        if not self.federated_eval_due(server_round):
            return []
        messages = []
        self._eval_sent = {}  # replies are matched by register_sent, as for training
        for pid in self.partitions:
            # A node that holds only some experts evaluates the model as it holds it (docs/design.md).
            absent, record, held = self._absent(pid), arrays, {}
            if absent is not None:
                record = encode(self.params, resident_names(self.params, absent))
                held = {keys.ABSENT_EXPERTS: flat_mask(absent, self.num_experts)}
            config_rec = ConfigRecord(
                {**dict(config), keys.SERVER_ROUND: server_round, **self.balance.eval_config(), **held}
            )
            content = RecordDict({keys.ARRAYS: record, keys.CONFIG: config_rec})
            self._eval_sent[pid] = payload_bytes(record)
            messages.append(
                Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=self.members[pid].node_id)
            )
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        result = federated_loss(replies, self._sender, self.max_eval_tokens)
        if result is None:
            return None
        record = {"federated_eval_loss": result[0], "eval_bytes_down": float(sum(self._eval_sent.values()))}
        if self.history and self.history[-1].round == server_round:
            self.history[-1].federated_eval_loss = record["federated_eval_loss"]
            self.history[-1].eval_bytes_down = record["eval_bytes_down"]
        return MetricRecord(record)
