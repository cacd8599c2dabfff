"""The app on a real loopback deployment: a TLS SuperLink and 2 authenticated SuperNode processes on 127.0.0.1."""

import json
import shlex
import tomllib
from pathlib import Path

import pytest

from micro import MICRO_MODEL
from sim.launcher import LocalDeployment, TlsFiles, write_connection
from tls_certs import make_node_key, make_tls

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
    certs = make_tls(tmp_path / "certs")
    tls = TlsFiles(certs["ca.crt"], certs["server.pem"], certs["server.key"])
    keys = [make_node_key(tmp_path / "keys", f"node{i}") for i in range(2)]
    with LocalDeployment(tmp_path / "flower", num_nodes=2, node_config={"work-dir": str(tmp_path / "nodes")},
                         tls=tls, node_keys=keys) as dep:
        assert "running on https://127.0.0.1" in dep.log_file.read_text()  # the SuperLink serves TLS only
        assert len(dep.online_node_ids()) == 2  # both keys registered and accepted
        assert dep.run(APP, run_config, timeout_s=420) == 0  # generous: 2 shared cores can be very busy
    summary = json.loads((tmp_path / "outputs" / "deploy" / "summary.json").read_text())
    assert summary["nodes"] == 2 and summary["rounds"] == 1
    assert summary["final_val_loss"] < summary["first_val_loss"]
    # Each SuperNode kept its own state, keyed by its partition id.
    assert sorted(p.name for p in (tmp_path / "nodes").glob("*/partition-*")) == ["partition-0", "partition-1"]


def test_tls_connection_and_auth_options_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_connection(tmp_path / "home", "fed", "127.0.0.1:9", Path("certs/ca.crt"))
    # Flower 1.42 refuses a relative root-certificates path, and a TLS connection is not insecure.
    assert tomllib.loads(path.read_text())["superlink"]["fed"] == {
        "address": "127.0.0.1:9", "root-certificates": str(tmp_path / "certs" / "ca.crt")}
    tls = TlsFiles(Path("ca.crt"), Path("server.pem"), Path("server.key"))
    pair = (Path("n.key"), Path("n.key.pub"))
    with pytest.raises(ValueError, match="needs tls"):
        LocalDeployment(tmp_path / "a", num_nodes=1, node_keys=[pair])
    with pytest.raises(ValueError, match="2 key pairs for 1 nodes"):
        LocalDeployment(tmp_path / "b", num_nodes=1, tls=tls, node_keys=[pair, pair])
