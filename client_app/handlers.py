"""What a node does with each message's content: setup, train, evaluate. Thin glue around
client_app.local_round, run in the `flwr-clientapp` process or in the node's worker
(client_app/worker.py); client_app/app.py decides which.

Everything received is checked before use: the run spec is validated again here (values
only), the run token must be a plain name, paths come from this node's own settings.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client_app.background_save import wait_for_saves
from client_app.local_round import DeltaDownlink, NodeContext, RoundOrder, run_local_eval, run_local_round
from client_app.node_settings import NodeSettings, NodeSetupError, hardware_report
from client_app.node_state import saved_steps
from common import keys
from common.atomic import write_text_atomic
from common.codec import decode, encode, to_record
from common.errors import ConfigError
from common.spec import RunSpec, from_dict
from data import tokenizer_from_json
from model.routing import unflatten

log = logging.getLogger("spes.node")
NodeConfig = Mapping[str, Any]


def _config(content: RecordDict) -> ConfigRecord:
    if keys.CONFIG not in content.config_records:
        raise ValueError("message without a config record")
    return content.config_records[keys.CONFIG]


def _int(cfg: ConfigRecord, key: str, minimum: int = 0) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"received {key}={value!r}; expected an integer >= {minimum}")
    return value


def _spec_for_node(cfg: ConfigRecord, settings: NodeSettings) -> tuple[RunSpec, str | None]:
    """The received spec with this node's own data source in place of the coordinator's."""
    raw = json.loads(str(cfg[keys.RUN_CONFIG]))
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
        raise ValueError("received run spec is not a config mapping")
    source, sharded = settings.data_source(str(raw["data"].get("source", "embedded")))
    raw["data"] = {**raw["data"], "source": source if sharded else "embedded"}
    raw.pop("init_from", None)  # the coordinator's checkpoint path: nothing for a node to open
    raw["train"] = {**raw.get("train", {}), **settings.hardware}  # how this node trains is its own call
    try:
        spec = from_dict(raw)
    except ConfigError as exc:
        if not settings.hardware:
            raise
        raise NodeSetupError(f"{exc} (with this node's node-config {settings.hardware})") from exc
    settings.check_run(spec)  # within this node's limits (node-config max-*)
    return spec, None if sharded else source


def _node(content: RecordDict, node_config: NodeConfig) -> tuple[NodeContext, ConfigRecord]:
    cfg = _config(content)
    settings = NodeSettings.from_node_config(node_config)
    spec, own_data = _spec_for_node(cfg, settings)
    workdir = settings.workdir(str(cfg[keys.RUN_TOKEN]))
    tok_path = workdir / "tokenizer.json"
    if not tok_path.exists():
        raise RuntimeError(f"{tok_path} missing: the coordinator's setup query did not reach this node")
    ctx = NodeContext(
        spec,
        tokenizer_from_json(tok_path.read_text()),
        workdir,
        settings.partition_id,
        settings.num_partitions,
        own_data,
        settings.show_progress(spec),
    )
    return ctx, cfg


def setup(content: RecordDict, node_config: NodeConfig) -> RecordDict:
    """Receive the run's config and tokenizer; report this node's partition and saved state."""
    cfg = _config(content)
    settings = NodeSettings.from_node_config(node_config)
    spec, _ = _spec_for_node(cfg, settings)  # a config this node cannot run fails here, before any round
    workdir = settings.workdir(str(cfg[keys.RUN_TOKEN]))
    write_text_atomic(workdir / "tokenizer.json", str(cfg[keys.TOKENIZER_JSON]))
    wait_for_saves(workdir / "state")  # a state still being written counts once it is there
    steps = saved_steps(workdir / "state")
    reply = ConfigRecord(
        {
            keys.PARTITION_ID: settings.partition_id,
            keys.NUM_PARTITIONS: settings.num_partitions,
            keys.STATE_STEP: steps[-1] if steps else -1,
            keys.NODE_HARDWARE: json.dumps(hardware_report(spec, settings)),
        }
    )
    if settings.residency is not None:
        reply[keys.RESIDENCY_ASK] = settings.residency
    return RecordDict({keys.CONFIG: reply})


def _routing(cfg: ConfigRecord, ctx: NodeContext):
    """The federation's expert load and the routing bias the coordinator sent (each may be absent)."""
    shape = (ctx.spec.model.num_layers, ctx.spec.model.num_experts)
    return (
        unflatten(cfg.get(keys.GLOBAL_LOAD), *shape, f"received {keys.GLOBAL_LOAD}"),
        unflatten(cfg.get(keys.ROUTER_BIAS), *shape, f"received {keys.ROUTER_BIAS}"),
    )


def _absent(cfg: ConfigRecord, ctx: NodeContext) -> list[list[int]]:
    """Per layer, the experts the coordinator says this node does not hold ([]: it holds all)."""
    shape = (ctx.spec.model.num_layers, ctx.spec.model.num_experts)
    mask = unflatten(cfg.get(keys.ABSENT_EXPERTS), *shape, f"received {keys.ABSENT_EXPERTS}")
    if mask is not None and not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"received {keys.ABSENT_EXPERTS}: a mask holds 0 and 1 only")
    return [] if mask is None else [row.nonzero().flatten().tolist() for row in mask]


def train(content: RecordDict, node_config: NodeConfig) -> RecordDict:
    ctx, cfg = _node(content, node_config)
    owned = cfg.get(keys.OWNED_EXPERTS)
    if not isinstance(owned, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in owned):
        raise ValueError(f"received {keys.OWNED_EXPERTS}={owned!r}; expected a list of integers")
    total = cfg.get(keys.TOTAL_STEPS)
    steps = _int(cfg, keys.LOCAL_STEPS, 1)
    NodeSettings.from_node_config(node_config).check_run(ctx.spec, steps)
    arrays = content.array_records[keys.ARRAYS]
    delta = None
    if ctx.spec.strategy.delta_sync:  # decoded against the model's shapes inside the round
        apply_own = cfg.get(keys.APPLY_OWN)
        if not isinstance(apply_own, bool):
            raise ValueError(f"received {keys.APPLY_OWN}={apply_own!r}; expected true or false")
        delta = DeltaDownlink(arrays, _int(cfg, keys.BASE_STEP, -1), apply_own)
    load, bias = _routing(cfg, ctx)
    absent = _absent(cfg, ctx)
    fragment = None
    if (fragments := ctx.spec.strategy.fragments) > 1:
        fragment = _int(cfg, keys.SYNC_FRAGMENT, 0)
        if fragment >= fragments:
            raise ValueError(f"received {keys.SYNC_FRAGMENT}={fragment}; the run has {fragments} fragments")
    order = RoundOrder(
        owned=owned,
        full_model=bool(cfg[keys.FULL_MODEL]),
        start_step=_int(cfg, keys.GLOBAL_STEP, 0),
        steps=steps,
        total_steps=_int(cfg, keys.TOTAL_STEPS, 1) if total is not None else None,
        delta=delta,
        global_load=load,
        router_bias=bias,
        fragment=fragment,
        absent=absent,
    )
    reply, metrics = run_local_round(ctx, {} if delta is not None else decode(arrays), order)
    record = to_record(reply) if delta is not None else encode(reply)
    return RecordDict({keys.ARRAYS: record, keys.METRICS: MetricRecord(metrics)})


def evaluate(content: RecordDict, node_config: NodeConfig) -> RecordDict:
    ctx, cfg = _node(content, node_config)
    # Not needed for the evaluation itself: it makes the run's final evaluation a point where every
    # node's last state is on disk, before a simulation's actors are shut down.
    wait_for_saves(ctx.workdir / "state")
    received = decode(content.array_records[keys.ARRAYS])
    loss, tokens = run_local_eval(ctx, received, _routing(cfg, ctx)[1], _absent(cfg, ctx))
    metrics = MetricRecord(
        {keys.EVAL_LOSS: loss, keys.EVAL_PPL: math.exp(min(loss, 50.0)), keys.NUM_TOKENS: float(tokens)}
    )
    return RecordDict({keys.METRICS: metrics})


HANDLERS: dict[str, Callable[[RecordDict, NodeConfig], RecordDict]] = {
    "setup": setup,
    "train": train,
    "evaluate": evaluate,
}
