"""A node asks for its own residency (node-config `residency`, issue 25): a node smaller than the
model joins a run of full replicas holding only its own experts. Through the real ClientApp and
coordinator in one process; a malformed ask fails the setup naming the node-config."""

from __future__ import annotations

import json

import pytest
from micro import MICRO_MODEL

from client_app import background_save, resident
from client_app.app import app as node_app
from client_app.node_settings import NodeSettings, NodeSetupError
from engine.inprocess import FIRST_NODE_ID, InProcessGrid, coordinator_identity, environment
from engine.simulate import node_environment
from model.experts import expert_modules
from server_app.config import load
from server_app.coordinator import run as coordinate
from strategy.residency import Residency

E = 4
BASE = [
    *MICRO_MODEL,
    f"model.num_experts={E}",
    "strategy.merge.top_k=2",
    "nodes=2",
    "rounds=2",
    "strategy.local_steps=2",
    "eval.max_batches=2",
]


def _run(tmp_path, overrides: list[str], asks: dict[int, str]) -> tuple[dict, list[dict], dict[int, list]]:
    """(summary, the rounds' metrics lines, partition -> the absent experts of the model it keeps)."""
    spec = load([*BASE, *overrides, f"output_dir={tmp_path}", "run_name=ask"])
    grid = InProcessGrid(node_app, spec.nodes)
    for pid, ask in asks.items():
        grid.contexts[FIRST_NODE_ID + pid].node_config["residency"] = ask
    try:
        with environment(node_environment(spec, tmp_path / "ask")), coordinator_identity(grid.run.run_id):
            summary = coordinate(grid, spec)
        background_save.drain()
        kept = {
            e.key.partition_id: [list(m.absent) for m in expert_modules(e.model)] for e, _ in resident._kept.values()
        }
    finally:
        resident.drop()
    lines = [json.loads(x) for x in (tmp_path / "ask" / "metrics.jsonl").read_text().splitlines()]
    return summary, [x for x in lines if "nodes" in x], kept


def test_a_small_node_holds_only_its_own_experts_in_a_run_of_full_replicas(tmp_path):
    summary, rounds, kept = _run(tmp_path, ["strategy.residency=all"], {1: "owned"})
    assert kept[0] == [[], []]  # the run's default: every expert
    assert kept[1] == [[0, 1], [0, 1]]  # partition 1 owns experts 2 and 3 and holds nothing else
    for line in rounds:
        full, small = line["nodes"]["0"], line["nodes"]["1"]
        assert small["resident_params"] < full["resident_params"] and small["weight_mb"] < full["weight_mb"]
        assert "absent_share" in small and "absent_share" not in full
    held = [e for e in summary["events"] if e["event"] == "residency"]
    assert [(e["partition"], e["experts"]) for e in held] == [(1, [[2, 3], [2, 3]])]
    assert summary["final_val_loss"] < summary["first_val_loss"]


def test_a_node_may_ask_for_more_than_the_run_gives(tmp_path):
    _, _, kept = _run(tmp_path, ["strategy.residency=owned"], {0: "all"})
    assert kept[0] == [[], []] and kept[1] == [[0, 1], [0, 1]]


def test_a_malformed_ask_is_refused_naming_the_node_config():
    base = {"partition-id": 0, "num-partitions": 2}
    assert NodeSettings.from_node_config({**base, "residency": "owned+2"}, env={}).residency == "owned+2"
    assert NodeSettings.from_node_config(base, env={}).residency is None
    for bad in ("some", "owned+0", 3):
        with pytest.raises(NodeSetupError, match="node-config residency must be all, owned or owned"):
            NodeSettings.from_node_config({**base, "residency": bad}, env={})


def test_an_ask_overrides_the_run_for_that_partition_until_it_asks_again():
    r = Residency("owned+1", num_experts=4, every=100)
    owners = {0: [0], 1: [1], 2: [2]}
    r.ask(1, "owned")
    r.ask(2, "all")
    assert r.update(1, owners, {}, None, num_layers=1) == {0: [[0, 1]], 1: [[1]]}
    assert r.absent(0) == [[2, 3]] and r.absent(1) == [[0, 2, 3]] and r.absent(2) is None
    r.ask(1, None)  # it rejoined without asking: the run's setting again, chosen at the next update
    assert r.absent(1) is None
    assert r.update(2, owners, {}, None, num_layers=1) == {1: [[0, 1]]}
    with pytest.raises(ValueError, match="must be all, owned or owned"):
        r.ask(0, "owned+0")
