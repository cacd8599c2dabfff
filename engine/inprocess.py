"""An in-process Flower `Grid`: the coordinator's messages handed straight to the nodes' ClientApp.

The same ServerApp round logic (`server_app.coordinator.run`) and the same ClientApp message handlers
(`client_app.app.app`) as a Flower simulation, without a SuperLink, Ray or any subprocess: a
message pushed to node `n` is copied (as the Flower runtime copies it between processes, so
neither side can see the other's objects change), handed to the ClientApp with node `n`'s own
`Context`, and its reply stored until it is pulled. An exception in the ClientApp becomes an
error reply worded as the Flower simulation words it.

Nodes run one after another in this process, each with `threads_per_node` torch threads (a
simulated node has one CPU by default), and the round's deadline is not enforced (a node is
never cut short: there is no clock to race here). Everything else a node does is unchanged: its
state on disk, the resident model it keeps between rounds, its background save.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client_app import background_save, resident
from client_app.app import app as node_app
from common.spec import RunSpec
from server_app.coordinator import run as coordinate

log = logging.getLogger("spes.engine")
FIRST_NODE_ID = 1_000  # node ids of the in-process nodes: FIRST_NODE_ID + partition id


class InProcessGrid(Grid):
    """`num_nodes` nodes with partition ids 0..num_nodes-1, served by `client_app` in this process."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_id: int = 1,
        threads_per_node: int = 1,
        node_config: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        if num_nodes < 1 or threads_per_node < 1:
            raise ValueError(f"need num_nodes >= 1 and threads_per_node >= 1, got {num_nodes}, {threads_per_node}")
        self.client_app = client_app
        self.threads_per_node = threads_per_node
        self._run = Run.create_empty(run_id)
        self.contexts = {
            FIRST_NODE_ID + i: Context(
                run_id,
                FIRST_NODE_ID + i,
                {PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes, **(node_config or {})},
                RecordDict(),
                {},
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self.messages_handled = 0

    # -- Grid API ----------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; its id (to pull the reply with), or '' for an unknown node."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            if msg.metadata.dst_node_id not in self.contexts:
                log.warning("message to unknown node %s dropped", msg.metadata.dst_node_id)
                ids.append("")
                continue
            reply = self._handle(copy.deepcopy(msg))
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._replies[msg.metadata.message_id] = copy.deepcopy(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # -- a node's side ---------------------------------------------------------------------------
    def _handle(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        self.messages_handled += 1
        with torch_threads(self.threads_per_node):
            try:
                return self.client_app(msg, context)
            except Exception as exc:  # as Flower's simulation reports a ClientApp that raised
                log.debug("node %s raised", msg.metadata.dst_node_id, exc_info=True)
                wrapped = ClientAppException(str(exc))
                reason = f"{type(wrapped)}:<'{wrapped}'>"
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` meanwhile (a node's `train.threads` may set its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def coordinator_identity(run_id: int) -> Iterator[None]:
    """Flower builds a message's metadata from the identity of the task running in the process."""
    before = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = before


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """`env` set in os.environ meanwhile: what a Flower simulation gives its node processes."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(spec: RunSpec, node_env: Mapping[str, str], threads_per_node: int = 1) -> dict:
    """Run `spec` with its `spec.nodes` nodes in this process; the run summary (as the ServerApp writes it)."""
    grid = InProcessGrid(node_app, spec.nodes, threads_per_node=threads_per_node)
    try:
        with environment(node_env), coordinator_identity(grid.run.run_id):
            return coordinate(grid, spec)
    finally:
        # What a simulation's actors do when they are shut down: every node state on disk, memory freed.
        background_save.drain()
        resident.drop()
