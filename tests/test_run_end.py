"""The end of a completed run: the coordinator's `query.finish` to every node (server_app.rounds.
release_nodes) and what a node does with it (client_app.run_end: remove its run folder unless
node-config keep-state). The real SuperNode case runs in tests/test_documented_paths.py's recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from micro import MICRO_MODEL

from client_app.node_settings import ENV_KEEP_STATE, NodeSetupError
from client_app.run_end import finish_run
from common import keys
from engine import inprocess
from engine.inprocess import FIRST_NODE_ID, InProcessGrid
from engine.simulate import node_environment
from server_app.config import load
from server_app.rounds import Collector, release_nodes

TOKEN = "run-abc123"


def _finish(tmp_path: Path, **node_config) -> ConfigRecord:
    cfg = {"partition-id": 1, "num-partitions": 2, "work-dir": str(tmp_path), **node_config}
    content = RecordDict({keys.CONFIG: ConfigRecord({keys.RUN_TOKEN: TOKEN})})
    return finish_run(content, cfg).config_records[keys.CONFIG]


def _run_folder(tmp_path: Path, partitions=(0, 1)) -> dict[int, Path]:
    folders = {}
    for pid in partitions:
        folder = tmp_path / TOKEN / f"partition-{pid}"
        (folder / "state" / "step-000000000004").mkdir(parents=True)
        (folder / "state" / "step-000000000004" / "owned.safetensors").write_bytes(b"x" * (1000 + pid))
        (folder / "tokenizer.json").write_text("{}")
        folders[pid] = folder
    return folders


def test_a_node_removes_its_own_partition_and_then_the_empty_run_folder(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(ENV_KEEP_STATE, raising=False)
    folders = _run_folder(tmp_path)
    reply = _finish(tmp_path)
    assert reply[keys.STATE_KEPT] is False and reply[keys.STATE_BYTES] == 1001 + 2  # the state file and "{}"
    assert not folders[1].exists() and folders[0].is_dir()  # partition 0 is another node's
    assert _finish(tmp_path, **{"partition-id": 0})[keys.STATE_BYTES] == 1002
    assert not (tmp_path / TOKEN).exists() and tmp_path.is_dir()  # the work dir itself stays


def test_keep_state_keeps_the_folder_node_config_first_then_the_environment(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(ENV_KEEP_STATE, raising=False)
    folders = _run_folder(tmp_path, partitions=(1,))
    assert _finish(tmp_path, **{"keep-state": True})[keys.STATE_KEPT] is True
    monkeypatch.setenv(ENV_KEEP_STATE, "1")
    assert _finish(tmp_path)[keys.STATE_KEPT] is True
    assert folders[1].is_dir()
    reply = _finish(tmp_path, **{"keep-state": "false"})
    assert reply[keys.STATE_KEPT] is False and not folders[1].exists()
    monkeypatch.delenv(ENV_KEEP_STATE)
    again = _finish(tmp_path)  # nothing left: no error, nothing to report
    assert again[keys.STATE_KEPT] is False and again[keys.STATE_BYTES] == 0


def test_a_finish_message_cannot_name_a_folder_outside_the_work_dir(tmp_path: Path):
    cfg = {"partition-id": 0, "num-partitions": 1, "work-dir": str(tmp_path / "work")}
    (tmp_path / "victim").mkdir()
    with pytest.raises(NodeSetupError, match="not a plain name"):
        finish_run(RecordDict({keys.CONFIG: ConfigRecord({keys.RUN_TOKEN: "../victim"})}), cfg)
    with pytest.raises(ValueError, match="needs config.run-token"):
        finish_run(RecordDict({keys.CONFIG: ConfigRecord({})}), cfg)
    with pytest.raises(NodeSetupError, match="keep-state must be true or false"):
        finish_run(RecordDict({keys.CONFIG: ConfigRecord({keys.RUN_TOKEN: TOKEN})}), {**cfg, "keep-state": "maybe"})
    assert (tmp_path / "victim").is_dir()


def _scripted_nodes(replies: dict[int, object]) -> ClientApp:
    """Nodes answering `query.finish` as scripted per partition: (kept, bytes), an exception, or junk."""
    app = ClientApp()

    @app.query(keys.FINISH)
    def finish(msg: Message, context: Context) -> Message:
        assert msg.content.config_records[keys.CONFIG][keys.RUN_TOKEN] == TOKEN
        said = replies[int(context.node_config["partition-id"])]
        if isinstance(said, Exception):
            raise said
        if said == "junk":
            return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.STATE_KEPT: "yes"})}), reply_to=msg)
        kept, size = said
        reply = ConfigRecord({keys.STATE_KEPT: kept, keys.STATE_BYTES: size})
        return Message(RecordDict({keys.CONFIG: reply}), reply_to=msg)

    return app


def test_the_coordinator_reports_what_each_node_did_and_who_did_not_answer():
    said = {0: (False, 3 * 2**20), 1: (True, 2**19), 2: RuntimeError("disk is read-only"), 3: "junk"}
    grid = InProcessGrid(_scripted_nodes(said), num_nodes=4)
    members = {FIRST_NODE_ID + p: p for p in range(4)}
    members[99_999] = 4  # a node that left: its message goes nowhere
    with inprocess.coordinator_identity(grid.run.run_id):
        lines = release_nodes(grid, members, TOKEN, Collector(grid), timeout_s=1.0)
    assert lines[:2] == [
        "partition 0: removed its run folder, 3.0 MiB",
        "partition 1: kept its run folder (keep-state), 0.5 MiB",
    ]
    assert lines[2].startswith("partition 2: did not release its run folder (") and "disk is read-only" in lines[2]
    assert lines[3] == "partition 3: did not release its run folder (a malformed reply)"
    assert lines[4] == "partition 4: no answer, its run folder stays"
    assert len(lines) == 5


def test_a_completed_run_leaves_no_node_folder_unless_its_nodes_keep_state(tmp_path: Path, capsys):
    """A real run on the in-process engine: nodes without keep-state remove their folders at the end
    (what `flwr run .` nodes and SuperNodes do); `python -m sim`'s nodes keep theirs."""
    base = [*MICRO_MODEL, "model.num_experts=4", "nodes=2", "strategy.local_steps=2", "rounds=1"]
    base += ["strategy.merge.enabled=false", "eval.max_batches=2", f"output_dir={tmp_path}"]
    spec = load([*base, "run_name=gone"])
    env = {k: v for k, v in node_environment(spec, tmp_path / "gone").items() if k != ENV_KEEP_STATE}
    inprocess.run(spec, env)
    out = capsys.readouterr().out
    assert "partition 0: removed its run folder" in out and "partition 1: removed its run folder" in out, out[-2000:]
    assert list((tmp_path / "gone" / "nodes").iterdir()) == []
    assert json.loads((tmp_path / "gone" / "summary.json").read_text())["rounds"] == 1  # outputs untouched
    kept = load([*base, "run_name=kept"])
    inprocess.run(kept, node_environment(kept, tmp_path / "kept"))
    assert "partition 1: kept its run folder (keep-state)" in capsys.readouterr().out
    assert len(list((tmp_path / "kept" / "nodes").glob("*/partition-*/state/step-000000000002"))) == 2


class _Unreachable(InProcessGrid):
    def push_messages(self, messages):
        raise ConnectionError("SuperLink gone")


def test_a_transport_failure_at_the_end_leaves_the_folders_and_does_not_fail_the_run():
    grid = _Unreachable(_scripted_nodes({}), num_nodes=2)
    with inprocess.coordinator_identity(grid.run.run_id):
        lines = release_nodes(grid, {FIRST_NODE_ID: 0, FIRST_NODE_ID + 1: 1}, TOKEN, Collector(grid), timeout_s=1.0)
    assert lines == [f"partition {p}: no answer, its run folder stays" for p in (0, 1)]
