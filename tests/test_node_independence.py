"""A node imports nothing of the coordinator and checks only what concerns it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

ROOT = Path(__file__).resolve().parent.parent


def _assert_import_loads_none_of(imports: str, packages: tuple[str, ...]) -> None:
    """A fresh interpreter imports `imports`; no module of `packages` may have been loaded."""
    code = (
        f"import sys; import {imports}; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {packages!r}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_node_code_never_imports_the_coordinator():
    _assert_import_loads_none_of("client_app.app, client_app.handlers, client_app.worker", ("server_app", "strategy"))


def test_the_clientapp_module_imports_neither_torch_nor_transformers():
    """In deployment every message starts a fresh `flwr-clientapp` process; one that its node's worker
    serves must not pay for torch and transformers (about 4-10 s) before handing the message over."""
    _assert_import_loads_none_of("client_app.app", ("torch", "transformers", "datasets", "tokenizers"))


def _spec_json(**changes):
    from server_app.config import compose

    raw = compose([])
    raw["data"]["source"] = changes.pop("source", raw["data"]["source"])
    raw.update(changes)
    return json.dumps(raw)


def test_node_ignores_coordinator_only_paths(tmp_path):
    from client_app.handlers import _spec_for_node
    from client_app.node_settings import NodeSettings, NodeSetupError

    settings = NodeSettings.from_node_config(
        {"partition-id": 0, "num-partitions": 4, "work-dir": str(tmp_path)}, env={}
    )
    # A checkpoint path that exists only on the coordinator: the node neither checks nor keeps it.
    spec, own = _spec_for_node(ConfigRecord({"run-config": _spec_json(init_from="/only/on/coordinator")}), settings)
    assert spec.init_from is None and own is None and spec.data.source == "embedded"
    # A corpus path on the coordinator is refused with what to set, never opened.
    with pytest.raises(NodeSetupError, match="common-data"):
        _spec_for_node(ConfigRecord({"run-config": _spec_json(source="/only/on/coordinator/corpus")}), settings)
    # With this node's own copy configured, that copy is sharded like the common corpus.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n\nmore text\n")
    mine = NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 4, "common-data": str(corpus)}, env={})
    spec, own = _spec_for_node(ConfigRecord({"run-config": _spec_json(source="/only/on/coordinator/corpus")}), mine)
    assert spec.data.source == str(corpus) and own is None


def test_node_work_dir_comes_from_the_node(tmp_path):
    from client_app.node_settings import ENV_WORK_DIR, NodeSettings

    cfg = {"partition-id": 1, "num-partitions": 2, "work-dir": str(tmp_path / "mine")}
    s = NodeSettings.from_node_config(cfg, env={ENV_WORK_DIR: str(tmp_path / "env")})
    assert s.workdir("run-abc") == (tmp_path / "mine" / "run-abc" / "partition-1").resolve()
    s = NodeSettings.from_node_config(
        {"partition-id": 1, "num-partitions": 2}, env={ENV_WORK_DIR: str(tmp_path / "env")}
    )
    assert s.workdir("run-abc") == (tmp_path / "env" / "run-abc" / "partition-1").resolve()


def test_node_opens_no_hub_source_it_only_received(tmp_path):
    from client_app.handlers import _spec_for_node
    from client_app.node_settings import NodeSettings, NodeSetupError

    settings = NodeSettings.from_node_config(
        {"partition-id": 0, "num-partitions": 4, "work-dir": str(tmp_path)}, env={}
    )
    # `hf:` is a hub download, or a local folder of that name: the coordinator does not decide that here.
    with pytest.raises(NodeSetupError, match="common-data='hf:/etc'"):
        _spec_for_node(ConfigRecord({"run-config": _spec_json(source="hf:/etc")}), settings)
    mine = NodeSettings.from_node_config(
        {"partition-id": 0, "num-partitions": 4, "common-data": "hf:wikitext:wikitext-2-raw-v1"}, env={}
    )
    spec, own = _spec_for_node(ConfigRecord({"run-config": _spec_json(source="hf:wikitext:wikitext-2-raw-v1")}), mine)
    assert spec.data.source == "hf:wikitext:wikitext-2-raw-v1" and own is None


def test_node_refuses_runs_beyond_its_limits(tmp_path):
    from client_app.handlers import _spec_for_node
    from client_app.node_settings import NodeSettings, NodeSetupError

    base = {"partition-id": 0, "num-partitions": 4, "work-dir": str(tmp_path)}
    demo = ConfigRecord({"run-config": _spec_json()})
    spec, _ = _spec_for_node(demo, NodeSettings.from_node_config(base, env={}))  # the defaults take the demo
    small = NodeSettings.from_node_config({**base, "max-params": 1_000_000}, env={})
    with pytest.raises(
        NodeSetupError, match=r"refuses a model of 3,876,224 parameters \(its max-params is 1,000,000\)"
    ):
        _spec_for_node(demo, small)
    with pytest.raises(NodeSetupError, match=r"refuses 1,024 tokens per step \(its max-batch-tokens is 1,000\)"):
        NodeSettings.from_node_config({**base, "max-batch-tokens": 1000}, env={}).check_run(spec)
    with pytest.raises(NodeSetupError, match=r"refuses 1,000,000,000 local steps per round \(its max-local-steps"):
        NodeSettings.from_node_config(base, env={}).check_run(spec, local_steps=10**9)
    with pytest.raises(NodeSetupError, match="max-local-steps must be a positive integer"):
        NodeSettings.from_node_config({**base, "max-local-steps": "many"}, env={})


def test_progress_bars_are_the_nodes_call_else_the_runs(tmp_path):
    from client_app.node_settings import ENV_PROGRESS, NodeSettings, NodeSetupError
    from common.spec import from_dict
    from server_app.config import compose

    base = {"partition-id": 0, "num-partitions": 2}
    quiet, loud = (from_dict(compose([f"logging.node_progress={v}"])) for v in ("false", "true"))
    runs_call = NodeSettings.from_node_config(base, env={})
    assert (runs_call.show_progress(quiet), runs_call.show_progress(loud)) == (False, True)
    node_on = NodeSettings.from_node_config({**base, "progress": "true"}, env={})
    node_off = NodeSettings.from_node_config({**base, "progress": False}, env={})
    assert (node_on.show_progress(quiet), node_off.show_progress(loud)) == (True, False)
    env_off = NodeSettings.from_node_config({**base, "progress": True}, env={ENV_PROGRESS: "0"})
    assert env_off.show_progress(loud) is False  # the environment wins over node-config
    with pytest.raises(NodeSetupError, match="progress must be true or false"):
        NodeSettings.from_node_config({**base, "progress": "sometimes"}, env={})
