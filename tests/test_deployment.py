"""The app on a real loopback deployment: a SuperLink and 2 SuperNode processes on 127.0.0.1."""

import json
import shlex
from pathlib import Path

from micro import MICRO_MODEL
from sim.launcher import LocalDeployment

APP = Path(__file__).resolve().parent.parent
OVERRIDES = [
    *MICRO_MODEL, "model.num_experts=4", "strategy.merge.top_k=2",
    "nodes=2", "rounds=1", "strategy.local_steps=2", "run_name=deploy",
]


def test_two_supernodes_on_loopback(tmp_path):
    run_config = {
        "overrides": " ".join(shlex.quote(o) for o in OVERRIDES),
        "output-dir": str(tmp_path / "outputs"),
    }
    with LocalDeployment(tmp_path / "flower", num_nodes=2, node_config={"work-dir": str(tmp_path / "nodes")}) as dep:
        assert dep.run(APP, run_config, timeout_s=300) == 0
    summary = json.loads((tmp_path / "outputs" / "deploy" / "summary.json").read_text())
    assert summary["nodes"] == 2 and summary["rounds"] == 1
    assert summary["final_val_loss"] < summary["first_val_loss"]
    # Each SuperNode kept its own state, keyed by its partition id.
    assert sorted(p.name for p in (tmp_path / "nodes").glob("*/partition-*")) == ["partition-0", "partition-1"]
