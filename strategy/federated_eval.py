"""The nodes' own evaluation of the global model: each scores it on its held-out shard, the coordinator
takes the token-weighted mean of the replies that pass the checks (strategy/validation.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import Message

from common import keys
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
