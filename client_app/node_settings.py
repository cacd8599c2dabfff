"""A node's own settings: where it keeps state and which data it reads.

Only the node decides paths on the node: its node-config (`flower-supernode --node-config`)
and environment win, and nothing received from the coordinator may name a path here. The run
token that names the node's state directory is checked to be a plain name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Environment of a node process (the simulation launcher sets them for its virtual nodes).
ENV_WORK_DIR = "SPES_NODE_WORK_DIR"
ENV_COMMON_DATA = "SPES_NODE_COMMON_DATA"  # local copy of the run's common corpus (sharded like any source)
ENV_PROGRESS = "SPES_NODE_PROGRESS"  # "0": no per-step progress bar
DEFAULT_WORK_DIR = "~/.cache/spes-flower/nodes"
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class NodeSetupError(ValueError):
    """This node cannot take part as configured; the message says what to set."""


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int
    num_partitions: int
    work_root: Path
    own_data: str | None = None  # node-config data-source: train on all of it instead of a shard
    common_data: str | None = None  # node-config common-data: where this node keeps the run's corpus
    progress: bool = True

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> NodeSettings:
        if "partition-id" not in cfg or "num-partitions" not in cfg:
            raise NodeSetupError(
                'this SuperNode needs --node-config "partition-id=<i> num-partitions=<n>" '
                "(simulation sets both automatically)"
            )
        try:
            pid, parts = int(cfg["partition-id"]), int(cfg["num-partitions"])
        except (TypeError, ValueError):
            raise NodeSetupError(f"partition-id and num-partitions must be integers, got {dict(cfg)}") from None
        if not 0 <= pid < parts:
            raise NodeSetupError(f"partition-id must be in [0, num-partitions={parts}), got {pid}")
        root = str(cfg.get("work-dir") or env.get(ENV_WORK_DIR) or DEFAULT_WORK_DIR)
        return cls(
            partition_id=pid,
            num_partitions=parts,
            work_root=Path(root).expanduser().resolve(),
            own_data=str(cfg["data-source"]) if cfg.get("data-source") else None,
            common_data=str(cfg.get("common-data") or env.get(ENV_COMMON_DATA) or "") or None,
            progress=env.get(ENV_PROGRESS, "1") != "0",
        )

    def workdir(self, run_token: str) -> Path:
        """`<work root>/<run token>/partition-<i>`, refusing any token that is not a plain name."""
        if not isinstance(run_token, str) or not _TOKEN.match(run_token) or ".." in run_token:
            raise NodeSetupError(f"refusing run token {run_token!r}: not a plain name")
        path = (self.work_root / run_token / f"partition-{self.partition_id}").resolve()
        if self.work_root not in path.parents:
            raise NodeSetupError(f"refusing run token {run_token!r}: it leaves the work dir {self.work_root}")
        return path

    def data_source(self, received: str) -> tuple[str, bool]:
        """(source this node reads, whether it takes its shard of it).

        The coordinator's `data.source` is used only when it names no path (`embedded`, `hf:`);
        a path on the coordinator means nothing here, and reading whatever this node has at that
        path could ship local data back inside the weights.
        """
        if self.own_data:
            return self.own_data, False
        if received == "embedded" or received.startswith("hf:"):
            return received, True
        if self.common_data:
            return self.common_data, True
        raise NodeSetupError(
            f"the run's data.source is a path on the coordinator ({received!r}); this node does not open "
            "paths it receives. Give it its copy of that corpus with --node-config \"common-data='/path'\" "
            "or its own data with data-source='/path'"
        )
