"""Flower ClientApp: a SPES node. Thin glue: each message's content goes to client_app/handlers.py,
in this process or in the node's resident worker (client_app/worker_link.py decides).

Imports nothing heavy: in deployment Flower runs every message in a fresh process, and a message
that the worker serves should not pay for torch and transformers here.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.worker_link import run
from common.keys import FINISH

app = ClientApp()


@app.query()
def setup(msg: Message, context: Context) -> Message:
    """Receive the run's config and tokenizer; report this node's partition and saved state."""
    return Message(run("setup", msg.content, context.node_config), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(run("train", msg.content, context.node_config), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(run("evaluate", msg.content, context.node_config), reply_to=msg)


@app.query(FINISH)
def finish(msg: Message, context: Context) -> Message:
    """The run completed: free what this node holds for it (client_app/run_end.py)."""
    from client_app.run_end import finish_run

    return Message(finish_run(msg.content, context.node_config), reply_to=msg)
