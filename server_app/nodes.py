"""Learn which SuperNodes take part and their partition ids (the server cannot read node_config)."""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("spes.server")


def discover_nodes(grid: Grid, wanted: int, setup: ConfigRecord, timeout_s: float) -> dict[int, int]:
    """Wait for `wanted` nodes, send each the run setup, return node id -> partition id.

    If more nodes are connected, the ones with the lowest partition ids take part.
    """
    deadline = time.monotonic() + timeout_s
    while len(node_ids := list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {wanted} SuperNodes, {len(node_ids)} connected")
        time.sleep(1.0)
    messages = [
        Message(RecordDict({"config": setup}), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids
    ]
    partitions: dict[int, int] = {}
    errors = []
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        if reply.has_error():
            errors.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        partitions[reply.metadata.src_node_id] = int(reply.content["config"]["partition-id"])
    if errors:
        raise RuntimeError("node setup failed: " + "; ".join(errors))
    if len(partitions) < wanted:
        raise RuntimeError(f"only {len(partitions)} of {wanted} nodes answered the setup query")
    chosen = sorted(partitions, key=lambda n: partitions[n])[:wanted]
    pids = [partitions[n] for n in chosen]
    if len(set(pids)) != len(pids):
        raise RuntimeError(f"two SuperNodes share a partition id: {sorted(pids)}")
    idle = sorted(set(partitions) - set(chosen))
    if idle:
        log.warning("%d extra SuperNode(s) stay idle: partitions %s", len(idle), [partitions[n] for n in idle])
    return {n: partitions[n] for n in chosen}
