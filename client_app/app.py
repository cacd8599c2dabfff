"""Flower ClientApp: a SPES node. Thin glue around client_app.local_round."""

from __future__ import annotations

import logging
import math

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.local_round import NodeContext, run_local_eval, run_local_round
from client_app.node_state import default_work_root, node_dir, write_text_atomic
from data import tokenizer_from_json
from server_app.config import RunSpec
from strategy.codec import decode, encode

app = ClientApp()
log = logging.getLogger("spes.node")


def _partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError(
            "this SuperNode needs --node-config \"partition-id=<i> num-partitions=<n>\" "
            "(simulation sets both automatically)"
        )
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


def _workdir(context: Context, spec: RunSpec, token: str, partition_id: int):
    root = context.node_config.get("work-dir") or context.run_config.get("node-work-dir") or spec.node_work_dir
    return node_dir(root or default_work_root(), token, partition_id)


def _node(msg: Message, context: Context) -> NodeContext:
    cfg = msg.content["config"]
    spec = RunSpec.from_json(str(cfg["run-config"]))
    pid, parts = _partition(context)
    workdir = _workdir(context, spec, str(cfg["run-token"]), pid)
    tok_path = workdir / "tokenizer.json"
    if not tok_path.exists():
        raise RuntimeError(f"{tok_path} missing: the coordinator's setup query did not reach this node")
    source = context.node_config.get("data-source")
    return NodeContext(spec, tokenizer_from_json(tok_path.read_text()), workdir, pid, parts, source or None)


@app.query()
def setup(msg: Message, context: Context) -> Message:
    """Receive the run's config and tokenizer; report this node's partition."""
    cfg = msg.content["config"]
    spec = RunSpec.from_json(str(cfg["run-config"]))
    pid, parts = _partition(context)
    workdir = _workdir(context, spec, str(cfg["run-token"]), pid)
    write_text_atomic(workdir / "tokenizer.json", str(cfg["tokenizer-json"]))
    reply = ConfigRecord({"partition-id": pid, "num-partitions": parts, "workdir": str(workdir)})
    return Message(RecordDict({"config": reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    ctx = _node(msg, context)
    cfg = msg.content["config"]
    reply, metrics = run_local_round(
        ctx,
        decode(msg.content["arrays"]),
        owned=[int(e) for e in cfg["owned-experts"]],
        full_model=bool(cfg["full-model"]),
        start_step=int(cfg["global-step"]),
        steps=int(cfg["local-steps"]),
    )
    content = RecordDict({"arrays": encode(reply), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    ctx = _node(msg, context)
    loss, tokens = run_local_eval(ctx, decode(msg.content["arrays"]))
    metrics = MetricRecord({"eval-loss": loss, "eval-ppl": math.exp(min(loss, 50.0)), "num-tokens": float(tokens)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
