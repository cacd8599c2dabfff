"""A node's own settings: where it keeps state and which data it reads.

Only the node decides paths on the node: its node-config (`flower-supernode --node-config`)
and environment win, and nothing received from the coordinator may name a path here. The run
token that names the node's state directory is checked to be a plain name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import keys

if TYPE_CHECKING:
    from common.spec import RunSpec

# Environment of a node process (the simulation launcher sets them for its virtual nodes).
ENV_WORK_DIR = "SPES_NODE_WORK_DIR"
ENV_COMMON_DATA = "SPES_NODE_COMMON_DATA"  # local copy of the run's common corpus (sharded like any source)
ENV_PROGRESS = "SPES_NODE_PROGRESS"  # "1"/"0": per-step progress bar or not, whatever the run says
ENV_KEEP_STATE = "SPES_NODE_KEEP_STATE"  # "1": keep a completed run's folder (node-config keep-state wins)
DEFAULT_WORK_DIR = "~/.cache/spes-flower/nodes"
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _limits(cfg: Mapping[str, Any]) -> dict[str, int]:
    out = {}
    for key, field_name in (
        ("max-local-steps", "max_local_steps"),
        ("max-params", "max_params"),
        ("max-batch-tokens", "max_batch_tokens"),
    ):
        if key in cfg:
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NodeSetupError(f"node-config {key} must be a positive integer, got {value!r}")
            out[field_name] = value
    return out


def node_gpus(cfg: Mapping[str, Any]) -> int:
    """node-config gpus (default 1): the node's ranks, one per GPU."""
    value = cfg.get("gpus", 1)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise NodeSetupError(f"node-config gpus must be an integer in [1, 64], got {value!r}")
    return value


def _flag(key: str, value: Any) -> bool:
    """A node-config switch: true/false (Flower parses those), or 1/0, on/off as text."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "on"):
        return True
    if str(value).lower() in ("false", "0", "off"):
        return False
    raise NodeSetupError(f"node-config {key} must be true or false, got {value!r}")


def _progress(cfg: Mapping[str, Any], env: Mapping[str, str]) -> bool | None:
    """The node's own say on per-step progress bars: the environment, else node-config progress, else None."""
    if ENV_PROGRESS in env:
        return env[ENV_PROGRESS] != "0"
    value = cfg.get("progress")
    return None if value is None else _flag("progress", value)


def hardware_report(spec: RunSpec, settings: NodeSettings) -> dict[str, Any]:
    """What the node trains with (the run's value where its node-config sets none) and what it set itself."""
    out: dict[str, Any] = {name: getattr(spec.train, name) for name in keys.NODE_HARDWARE_KEYS.values()}
    out["set-by-node"] = sorted(key for key, name in keys.NODE_HARDWARE_KEYS.items() if name in settings.hardware)
    return out


def _hardware(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The train.* settings this node's node-config decides (checked again with the run's spec)."""
    out: dict[str, Any] = {}
    for key, name in keys.NODE_HARDWARE_KEYS.items():
        if key not in cfg:
            continue
        value = cfg[key]
        if name in ("lean_loss", "activation_checkpointing"):
            value = _flag(key, value)
        elif name == "threads":
            if isinstance(value, bool) or not str(value).isdigit():
                raise NodeSetupError(f"node-config threads must be an integer >= 0, got {value!r}")
            value = int(value)
        else:
            value = str(value)
        out[name] = value
    return out


def _residency(cfg: Mapping[str, Any]) -> str | None:
    """node-config residency (all, owned, owned+<k>): a node smaller than the model asks to hold less."""
    from common.strategy_checks import RESIDENCY

    value = cfg.get("residency")
    if value is None:
        return None
    if not isinstance(value, str) or RESIDENCY.match(value) is None:
        raise NodeSetupError(f"node-config residency must be all, owned or owned+<k> (k >= 1), got {value!r}")
    return value


class NodeSetupError(ValueError):
    """This node cannot take part as configured; the message says what to set."""


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int
    num_partitions: int
    work_root: Path
    own_data: str | None = None  # node-config data-source: train on all of it instead of a shard
    common_data: str | None = None  # node-config common-data: where this node keeps the run's corpus
    progress: bool | None = None  # None: the run's logging.node_progress decides (see show_progress)
    keep_state: bool = False  # keep the run's folder when the run completes (node-config keep-state)
    # What this node agrees to run, whatever the coordinator sends (node-config max-*).
    max_local_steps: int = 10_000
    max_params: int = 20_000_000_000
    max_batch_tokens: int = 1_048_576
    residency: str | None = None  # node-config residency: what this node holds, whatever strategy.residency says
    hardware: dict[str, Any] = field(
        default_factory=dict
    )  # train.* set by node-config (common.keys.NODE_HARDWARE_KEYS)

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
            progress=_progress(cfg, env),
            keep_state=_flag("keep-state", cfg.get("keep-state", env.get(ENV_KEEP_STATE, "0"))),
            hardware=_hardware(cfg),
            residency=_residency(cfg),
            **_limits(cfg),
        )

    def show_progress(self, spec: RunSpec) -> bool:
        """Per-step progress bars: the node's own say if it has one, else the run's logging.node_progress."""
        return spec.logging.node_progress if self.progress is None else self.progress

    def check_run(self, spec: RunSpec, local_steps: int | None = None) -> None:
        """Refuse a run (or a round of `local_steps`) beyond this node's limits, naming the node-config key."""
        from model.args import build_config, count_parameters  # torch + transformers: not at import

        m = spec.model
        params = count_parameters(build_config(m, m.vocab_size or spec.data.vocab_size))["total"]
        tokens = spec.train.batch_size * spec.data.seq_len
        steps = spec.strategy.local_steps if local_steps is None else local_steps
        for value, limit, key, what in (
            (params, self.max_params, "max-params", f"a model of {params:,} parameters"),
            (tokens, self.max_batch_tokens, "max-batch-tokens", f"{tokens:,} tokens per step"),
            (steps, self.max_local_steps, "max-local-steps", f"{steps:,} local steps per round"),
        ):
            if value > limit:
                raise NodeSetupError(f"this node refuses {what} (its {key} is {limit:,}); raise --node-config {key}")

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

        The coordinator's `data.source` is used only when it is the corpus that ships with Python
        (`embedded`); anything else it names is opened only as this node's own setting says. A path
        on the coordinator means nothing here, and reading whatever this node has at that path could
        ship local data back inside the weights; an `hf:` source is a hub download or, for a name
        that is a local folder, a path again.
        """
        if self.own_data:
            return self.own_data, False
        if received == "embedded":
            return received, True
        if self.common_data:
            return self.common_data, True
        if received.startswith("hf:"):
            raise NodeSetupError(
                f"the run's data.source is {received!r}: this node would fetch it from the Hugging Face hub, "
                "or read a local folder of that name, because the coordinator said so. A node opens only what "
                f"its own settings name: give it --node-config \"common-data='{received}'\" (or its copy of "
                "the corpus)"
            )
        raise NodeSetupError(
            f"the run's data.source is a path on the coordinator ({received!r}); this node does not open "
            "paths it receives. Give it its copy of that corpus with --node-config \"common-data='/path'\" "
            "or its own data with data-source='/path'"
        )
