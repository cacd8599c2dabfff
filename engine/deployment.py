"""A Flower deployment on loopback: a SuperLink and N SuperNodes on 127.0.0.1, started and stopped by
PID (the README's federation recipe and the fault suite's killed SuperNode run on it)."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from engine.flwr_config import (
    HOST,
    LOCAL_CONNECTION,
    RunConfigValue,
    TlsFiles,
    find_free_port,
    flower_exe,
    flwr_json,
    format_run_config,
    log_tail,
)
from engine.launcher import FlowerLocal

log = logging.getLogger("engine.launcher")


class LocalDeployment(FlowerLocal):
    """A deployment on loopback: ``flower-superlink --isolation subprocess --host 127.0.0.1
    --port <P> --database ...`` plus N ``flower-supernode --superlink 127.0.0.1:<P>
    --node-config "partition-id=i num-partitions=N ..." --host 127.0.0.1 --port <free>``
    (each with cwd and ``FLWR_HOME`` under ``<run_dir>/supernode-<i>``); connection
    ``spes-local``. ``__enter__`` returns when all N SuperNodes are online.

    Without ``tls`` everything runs ``--insecure``. With ``tls`` the SuperLink serves HTTPS
    with those files and SuperNodes and ``flwr`` verify it with ``--root-certificates``.
    With ``node_keys`` (one ``(private, public)`` OpenSSH key pair per node) the SuperLink
    runs ``--enable-supernode-auth``, each public key is registered with ``flwr supernode
    register`` and each SuperNode signs in with ``--auth-supernode-private-key``.
    ``supernode_cmd`` replaces ``flower-supernode`` (e.g. ``python -m client_app.supernode``).
    """

    connection = LOCAL_CONNECTION
    simulation = False

    def __init__(
        self,
        run_dir: Path,
        num_nodes: int,
        log_file: Path | None = None,
        startup_timeout: float = 90.0,
        stop_grace: float = 10.0,
        node_config: Mapping[str, RunConfigValue] | None = None,
        tls: TlsFiles | None = None,
        node_keys: Sequence[tuple[Path, Path]] | None = None,
        extra_env: Mapping[str, str] | None = None,
        supernode_cmd: Sequence[str] | None = None,
    ) -> None:
        super().__init__(run_dir, log_file, startup_timeout, stop_grace, tls, extra_env)
        self.supernode_cmd = list(supernode_cmd or [flower_exe("flower-supernode")])
        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        if node_keys is not None and len(node_keys) != num_nodes:
            raise ValueError(f"node_keys: {len(node_keys)} key pairs for {num_nodes} nodes")
        if node_keys is not None and tls is None:
            raise ValueError("node_keys (SuperNode authentication) needs tls")
        self.num_nodes = num_nodes
        self.node_config = dict(node_config or {})
        self.node_keys = None if node_keys is None else [(Path(a), Path(b)) for a, b in node_keys]
        self.node_ports: list[int] = []

    def __enter__(self) -> LocalDeployment:
        super().__enter__()
        return self

    def node_dir(self, i: int) -> Path:
        return self.run_dir / f"supernode-{i}"

    def node_log(self, i: int) -> Path:
        return self.run_dir / f"supernode-{i}.log"

    def _superlink_cmd(self, port: int) -> list[str]:
        cmd = super()._superlink_cmd(port)
        if self.node_keys is not None:
            cmd.append("--enable-supernode-auth")
        return cmd

    def register_supernode(self, public_key: Path) -> None:
        """``flwr supernode register <public_key> spes-local``; raises with Flower's
        message if the SuperLink does not accept the key."""
        res = subprocess.run(  # noqa: S603
            [flower_exe("flwr"), "supernode", "register", str(public_key), self.connection],
            env=self.env,
            cwd=str(self.run_dir),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode != 0 or "registered successfully" not in res.stdout:
            raise RuntimeError(
                f"`flwr supernode register {public_key}` failed (exit {res.returncode}): {res.stdout}{res.stderr}"
            )

    def start_supernode(
        self, i: int, num_partitions: int | None = None, private_key: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``flower-supernode`` number ``i`` (partition id ``i``) against this
        SuperLink, signing in with ``private_key`` if given; log in ``node_log(i)``."""
        node_dir = self.node_dir(i)
        node_dir.mkdir(parents=True, exist_ok=True)
        port = find_free_port()
        self.node_ports.append(port)
        cfg = format_run_config(
            {"partition-id": i, "num-partitions": num_partitions or self.num_nodes, **self.node_config}
        )
        if cfg is None:
            raise ValueError("node_config strings may not contain both quote kinds")
        security = (
            ["--insecure"] if self.tls is None else ["--root-certificates", str(Path(self.tls.ca_cert).resolve())]
        )
        if private_key is not None:
            security += ["--auth-supernode-private-key", str(Path(private_key).resolve())]
        cmd = [
            *self.supernode_cmd,
            *security,
            "--superlink",
            self.address,
            "--node-config",
            cfg,
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        return self._group.start(
            f"flower-supernode-{i}", cmd, self._env(node_dir / ".flwr"), node_dir, self.node_log(i)
        )

    def online_node_ids(self) -> list[int]:
        """Node ids the SuperLink lists as online (``flwr supernode list``)."""
        data = flwr_json(["supernode", "list", self.connection], self.env, self.run_dir, timeout=30)
        return [int(n["node-id"]) for n in (data or {}).get("nodes", []) if n.get("status") == "online"]

    def _after_superlink(self) -> None:
        procs = []
        for i in range(self.num_nodes):
            key = None
            if self.node_keys is not None:
                key, public = self.node_keys[i]
                self.register_supernode(public)
            procs.append(self.start_supernode(i, private_key=key))
        self.node_procs = procs  # so a fault test can kill one SuperNode
        deadline = time.monotonic() + self.startup_timeout
        online = 0
        while time.monotonic() < deadline:
            for i, proc in enumerate(procs):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"flower-supernode {i} exited with {proc.returncode}; log:\n" + log_tail(self.node_log(i))
                    )
            online = len(self.online_node_ids())
            if online >= self.num_nodes:
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"only {online}/{self.num_nodes} SuperNodes online after "
            f"{self.startup_timeout:.0f}s; last log:\n" + log_tail(self.node_log(self.num_nodes - 1))
        )

    def run(self, app_dir: Path, run_config: Mapping[str, RunConfigValue], timeout_s: float | None = None) -> int:
        """``flwr run <app_dir> spes-local --run-config ... --stream``; 0 on success."""
        return self._run(app_dir, run_config, timeout_s)
