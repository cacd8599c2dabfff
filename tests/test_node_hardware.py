"""Each node decides how it trains (node-config device, precision, optimizer, memory options): two
nodes of one run with different precision, through the real ClientApp and coordinator in one
process; the coordinator is told and the report says so. A value the node cannot use fails the
setup, naming the node-config."""

from __future__ import annotations

import json

import pytest
import torch
from micro import MICRO_MODEL

from client_app import background_save, resident
from client_app.app import app as node_app
from client_app.node_settings import NodeSettings, NodeSetupError
from engine.inprocess import FIRST_NODE_ID, InProcessGrid, coordinator_identity, environment
from engine.simulate import node_environment
from server_app.config import load
from server_app.coordinator import run as coordinate
from server_app.rounds import RunFailed

BASE = [
    *MICRO_MODEL,
    "model.num_experts=4",
    "strategy.merge.top_k=2",
    "nodes=2",
    "rounds=1",
    "strategy.local_steps=2",
    "eval.max_batches=2",
]


def _run(tmp_path, node_configs: dict[int, dict]):
    """One in-process run with per-partition node-config; (summary, {partition: dtypes of its kept model})."""
    spec = load([*BASE, f"output_dir={tmp_path}", "run_name=hw"])
    grid = InProcessGrid(node_app, spec.nodes)
    for pid, cfg in node_configs.items():
        grid.contexts[FIRST_NODE_ID + pid].node_config.update(cfg)
    try:
        with environment(node_environment(spec, tmp_path / "hw")), coordinator_identity(grid.run.run_id):
            summary = coordinate(grid, spec)
        background_save.drain()
        kept = {
            entry.key.partition_id: {p.dtype for p in entry.model.parameters()} for entry, _ in resident._kept.values()
        }
    finally:
        resident.drop()
    return summary, kept


def test_nodes_of_one_run_train_with_their_own_precision_and_the_report_says_so(tmp_path):
    summary, kept = _run(tmp_path, {1: {"precision": "bf16", "threads": 1}})
    assert kept[0] == {torch.float32}  # the run's default ...
    assert torch.bfloat16 in kept[1]  # ... and node 1's own: frozen experts stored in bf16
    hw = summary["node_hardware"]
    assert (hw["0"]["precision"], hw["0"]["set-by-node"]) == ("fp32", [])
    assert (hw["1"]["precision"], hw["1"]["threads"], hw["1"]["set-by-node"]) == ("bf16", 1, ["precision", "threads"])
    assert summary["final_val_loss"] < summary["first_val_loss"]
    report = (tmp_path / "hw" / "report.md").read_text()
    assert "partition 1: cpu bf16, adamw (set by the node: precision, threads)" in report
    assert json.loads((tmp_path / "hw" / "summary.json").read_text())["node_hardware"] == hw


def test_a_setting_the_node_cannot_use_fails_the_setup_naming_it(tmp_path):
    with pytest.raises(RunFailed, match=r"train.precision must be fp32 or bf16.*node-config \{'precision': 'fp16'\}"):
        _run(tmp_path, {0: {"precision": "fp16"}})
    base = {"partition-id": 0, "num-partitions": 2}
    for cfg, message in (
        ({"lean-loss": "maybe"}, "node-config lean-loss must be true or false"),
        ({"threads": "-1"}, "node-config threads must be an integer >= 0"),
    ):
        with pytest.raises(NodeSetupError, match=message):
            NodeSettings.from_node_config({**base, **cfg}, env={})
    on = NodeSettings.from_node_config({**base, "lean-loss": "on", "activation-checkpointing": False, "device": "cuda"})
    assert on.hardware == {"lean_loss": True, "activation_checkpointing": False, "device": "cuda"}
