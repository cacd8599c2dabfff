"""Checks of the loopback deployment's TLS and node-authentication options.

The app itself on a real TLS deployment with authenticated SuperNodes is run by
tests/test_documented_paths.py (the README's recipe as written), which asserts everything the
former separate 2-node run here did (summary, loss fell, state per partition in each node's own
work dir); a second full deployment here added CI time and nothing new."""

import tomllib
from pathlib import Path

import pytest

from engine.deployment import LocalDeployment
from engine.flwr_config import TlsFiles, write_connection


def test_tls_connection_and_auth_options_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_connection(tmp_path / "home", "fed", "127.0.0.1:9", Path("certs/ca.crt"))
    # Flower 1.42 refuses a relative root-certificates path, and a TLS connection is not insecure.
    assert tomllib.loads(path.read_text())["superlink"]["fed"] == {
        "address": "127.0.0.1:9",
        "root-certificates": str(tmp_path / "certs" / "ca.crt"),
    }
    tls = TlsFiles(Path("ca.crt"), Path("server.pem"), Path("server.key"))
    pair = (Path("n.key"), Path("n.key.pub"))
    with pytest.raises(ValueError, match="needs tls"):
        LocalDeployment(tmp_path / "a", num_nodes=1, node_keys=[pair])
    with pytest.raises(ValueError, match="2 key pairs for 1 nodes"):
        LocalDeployment(tmp_path / "b", num_nodes=1, tls=tls, node_keys=[pair, pair])
