"""The run spec: typed sections of the resolved config, with value checks that need no disk.

The coordinator composes the Hydra config once, checks what only it can check (paths on its
own disk, installed logging packages, a writable output dir: `server_app.config`) and sends
the resolved dict to every node as JSON. A node rebuilds the spec here and checks values only:
nothing in the spec names a path that a node would open.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from common.codec import Codec
from common.errors import ConfigError
from common.strategy_checks import finite as _finite
from common.strategy_checks import layout_checks, sync_checks
from common.strategy_checks import whole as _whole
from common.train_config import TrainConfig
from data.pipeline import DataConfig
from model.args import MoEArgs

TOP_LEVEL = {"run_name", "output_dir", "seed", "nodes", "rounds", "init_from", "resume", "deterministic", "engine"}
ENGINES = ("flower", "inprocess")
SECTIONS = {"model", "data", "train", "strategy", "eval", "logging"}
TOP_LEVEL_TYPES = {
    "run_name": str,
    "output_dir": str,
    "seed": int,
    "nodes": int,
    "rounds": int,
    "resume": bool,
    "deterministic": bool,
    "engine": str,
}


ASSIGNMENTS = ("contiguous", "replicated")
ASSIGNMENT_POLICIES = ("static", "load", "speed")  # strategy/load_aware.py


def _check_fields(section: str, cls: type, d: Mapping[str, Any]) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; known keys are {sorted(known)}")


@dataclass
class MergeSchedule:
    enabled: bool = True
    alpha_start: float = 0.01
    decay_steps: int = 10000
    interval: int = 500
    top_k: int = 4

    def validate(self, num_experts: int) -> None:
        if not self.enabled:
            return
        if not 1 <= self.top_k < num_experts:
            raise ValueError(f"strategy.merge.top_k must be in [1, num_experts) = [1, {num_experts}), got {self.top_k}")
        if self.interval < 1 or self.decay_steps < 1:
            raise ValueError("strategy.merge.interval and strategy.merge.decay_steps must be >= 1")
        if not (_finite(self.alpha_start) and 0.0 <= self.alpha_start <= 1.0):
            raise ValueError(f"strategy.merge.alpha_start must be in [0, 1], got {self.alpha_start}")

    def alpha(self, step: int) -> float:
        """Linear decay from alpha_start to 0 over decay_steps."""
        return self.alpha_start * (1.0 - min(step / self.decay_steps, 1.0))

    def due(self, prev_step: int, step: int) -> bool:
        """Merge when this sync crossed a multiple of `interval` (H need not divide it)."""
        if not self.enabled or self.alpha(step) <= 0.0:
            return False
        return step // self.interval > prev_step // self.interval


@dataclass
class GuardConfig:
    """The acceptance test of every round (strategy/guard.py)."""

    enabled: bool = True
    blocks: int = 32  # held-out blocks the guard scores, apart from those the reported evaluation scores
    tolerance: float = 0.02  # a rise in guard loss under this share of the loss always passes
    noise_factor: float = 3.0  # ... and one under this many standard deviations of the recent rounds' changes
    window: int = 8  # rounds whose changes measure that noise
    strikes: int = 2  # a node whose update the guard dropped this many times is quarantined (0: never)

    def validate(self) -> None:
        checks = (
            (
                _whole(self.blocks) and self.blocks >= 1,
                f"strategy.guard.blocks must be an integer >= 1, got {self.blocks!r}",
            ),
            (
                _finite(self.tolerance) and self.tolerance >= 0,
                f"strategy.guard.tolerance must be >= 0, got {self.tolerance}",
            ),
            (
                _finite(self.noise_factor) and self.noise_factor >= 0,
                f"strategy.guard.noise_factor must be >= 0, got {self.noise_factor}",
            ),
            (
                _whole(self.window) and self.window >= 3,
                f"strategy.guard.window must be an integer >= 3, got {self.window!r}",
            ),
            (
                _whole(self.strikes) and self.strikes >= 0,
                f"strategy.guard.strikes must be an integer >= 0, got {self.strikes!r}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class StrategyConfig:
    local_steps: int = 100
    assignment: str = "contiguous"  # contiguous (SPES) | replicated (every node trains every expert)
    # Ownership from measurement, every `assignment_every` rounds over that many past rounds:
    # static (never) | load (swap experts to even out routed load per node) | speed (experts per
    # node proportional to tokens/s). Needs an exclusive assignment (not replicated).
    assignment_policy: str = "static"
    assignment_every: int = 5
    # load: a swap must narrow the per-node load spread by more than this share of a node's mean load.
    assignment_tolerance: float = 0.05
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov: bool = False
    merge: MergeSchedule = field(default_factory=MergeSchedule)
    guard: GuardConfig = field(default_factory=GuardConfig)
    # Federated evaluation on the nodes' held-out shards every k rounds; 0 = last round only.
    federated_eval_every: int = 0
    # Mean of the shared weights: weighted by tokens trained, or plain (the reference).
    shared_weighting: str = "tokens"
    # Robust mean of the shared weights: drop this fraction of the extreme values per entry on each side.
    trim_fraction: float = 0.0
    # Coordinate-wise median of the shared weights instead of their mean (3+ nodes; strategy/aggregation.py).
    median: bool = False
    # Clip each update to this multiple of the round's median update norm: shared tensors against the
    # other nodes' (3+ nodes), an expert against the other experts of its layer (strategy/robust.py). 0 = off.
    clip_shared: float = 4.0
    clip_experts: float = 4.0
    # Reject an update whose distance to the global tensor exceeds this multiple of the global
    # tensor's norm (0 = off).
    max_update_ratio: float = 0.0
    # Reject an update holding any value larger than this in magnitude (0 = off).
    max_abs_value: float = 1.0e4
    # Quorum and deadline: a round closes when every node replied or after round_timeout_s; it
    # changes the model only with at least min_nodes valid updates (0 = all nodes).
    min_nodes: int = 1
    round_timeout_s: float = 3600.0
    # A node without a valid update for this many rounds in a row loses its experts to the
    # others (0 = never); it gets an assignment again when it comes back.
    reassign_after: int = 2
    # The run stops (and fails) after this many rounds in a row below quorum.
    max_failed_rounds: int = 3
    # Delta sync: nodes send the difference from the global weights they hold and the
    # coordinator sends each node only the tensors that changed since the version it holds.
    # Off = whole fp32 tensors, today's protocol and byte counts.
    delta_sync: bool = False
    uplink_codec: str = "fp32"  # fp32 | bf16 | int8 | topk2 | topk4 (needs delta_sync)
    downlink_codec: str = "fp32"  # fp32 | bf16 | int8 | topk2 | topk4 (needs delta_sync)
    int8_block: int = 0  # int8: values per scale; 0 = one scale per row
    # topk2/topk4 (SparseLoCo, arXiv 2508.15706): per chunk of topk_chunk elements keep the
    # ceil(topk_fraction * chunk) largest |entries|, at 2 or 4 bits with one scale per chunk.
    topk_chunk: int = 4096
    topk_fraction: float = 0.015625
    # Nodes keep what quantisation dropped and add it to the next round's difference (the
    # coordinator always keeps its downlink residual: the gap between the model and the nodes' copy).
    error_feedback: bool = True
    # Streaming fragments (Streaming DiLoCo, arXiv 2501.18512): > 1 splits the model into this many
    # fragments strided over the layers and syncs one per round, in turn (needs delta_sync); each
    # fragment is then synced every `fragments` rounds, so set local_steps to H / fragments.
    fragments: int = 1
    # Streaming DiLoCo's overlap: a node applies a synced fragment's global value only after this
    # many inner steps of the next round, mixed as fragment_mix x its own + (1 - fragment_mix) x
    # global (0 = at once, replaced); the exchange can then hide behind those steps.
    fragment_overlap: int = 0
    fragment_mix: float = 0.5
    # Partial residency: "all" (plain SPES), "owned" (a node holds, and is sent, only the experts it
    # trains) or "owned+k" (and per layer the k others its tokens use most); a pick of an absent
    # expert is dropped ("skip") or routed around ("mask").
    residency: str = "all"
    absent_policy: str = "skip"
    # The node's residual is multiplied by this before it is added (SparseLoCo's decay: < 1 lets
    # old residue fade, like outer momentum); 1 = plain error feedback.
    error_decay: float = 1.0
    # Balancing across nodes: per round, move each expert's routing bias by this much toward the
    # federation's mean load (aux-loss-free, DeepSeek-V3; model/routing.py). 0 = no bias.
    router_bias_rate: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StrategyConfig:
        d = dict(d)
        d.pop("name", None)
        merge, guard = d.pop("merge", {}), d.pop("guard", {})
        _check_fields("strategy", cls, d)
        _check_fields("strategy.merge", MergeSchedule, merge)
        _check_fields("strategy.guard", GuardConfig, guard)
        return cls(merge=MergeSchedule(**merge), guard=GuardConfig(**guard), **d)

    def validate(self, num_experts: int, num_nodes: int) -> None:
        if self.local_steps < 1:
            raise ValueError(f"strategy.local_steps must be >= 1, got {self.local_steps}")
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"unknown strategy.assignment {self.assignment!r}; choose one of {list(ASSIGNMENTS)}")
        if self.assignment == "contiguous" and num_experts < num_nodes:
            raise ValueError(
                f"SPES needs at least as many experts per layer as nodes (E >= N), got E={num_experts}, N={num_nodes}"
            )
        self.merge.validate(num_experts)
        self.guard.validate()
        for ok, message in (
            *self._round_checks(num_nodes),
            *self._ownership_checks(),
            *sync_checks(self),
            *layout_checks(self),
        ):
            if not ok:
                raise ValueError(message)

    def _round_checks(self, num_nodes: int) -> list[tuple[bool, str]]:
        """(holds, message) of the outer step, the robustness bounds and the quorum."""
        return [
            (self.federated_eval_every >= 0, "strategy.federated_eval_every must be >= 0"),
            (_finite(self.outer_lr) and self.outer_lr > 0, f"strategy.outer_lr must be > 0, got {self.outer_lr}"),
            (
                _finite(self.outer_momentum) and 0 <= self.outer_momentum < 1,
                f"strategy.outer_momentum must be in [0, 1), got {self.outer_momentum}",
            ),
            (
                self.shared_weighting in ("tokens", "uniform"),
                f"strategy.shared_weighting must be tokens or uniform, got {self.shared_weighting!r}",
            ),
            (
                _finite(self.trim_fraction) and 0 <= self.trim_fraction < 0.5,
                f"strategy.trim_fraction must be in [0, 0.5), got {self.trim_fraction}",
            ),
            (not (self.median and self.trim_fraction), "strategy.median and strategy.trim_fraction: choose one"),
            (
                _finite(self.clip_shared)
                and self.clip_shared >= 0
                and _finite(self.clip_experts)
                and self.clip_experts >= 0,
                f"strategy.clip_shared and clip_experts must be >= 0, got {self.clip_shared} and {self.clip_experts}",
            ),
            (
                _finite(self.max_update_ratio) and self.max_update_ratio >= 0,
                f"strategy.max_update_ratio must be >= 0, got {self.max_update_ratio}",
            ),
            (
                _finite(self.max_abs_value) and self.max_abs_value >= 0,
                f"strategy.max_abs_value must be >= 0, got {self.max_abs_value}",
            ),
            (
                0 <= self.min_nodes <= num_nodes,
                f"strategy.min_nodes must be in [0, nodes={num_nodes}], got {self.min_nodes}",
            ),
            (
                _finite(self.round_timeout_s) and self.round_timeout_s > 0,
                f"strategy.round_timeout_s must be > 0, got {self.round_timeout_s}",
            ),
            (self.max_failed_rounds >= 1, f"strategy.max_failed_rounds must be >= 1, got {self.max_failed_rounds}"),
        ]

    def _ownership_checks(self) -> list[tuple[bool, str]]:
        """(holds, message) of the settings that move experts between nodes."""
        return [
            (self.reassign_after >= 0, f"strategy.reassign_after must be >= 0, got {self.reassign_after}"),
            (
                self.assignment_policy in ASSIGNMENT_POLICIES,
                (
                    f"strategy.assignment_policy must be one of {list(ASSIGNMENT_POLICIES)}, "
                    f"got {self.assignment_policy!r}"
                ),
            ),
            (
                self.assignment_policy == "static" or self.assignment != "replicated",
                (
                    f"strategy.assignment_policy={self.assignment_policy} moves experts between owners, but "
                    "strategy.assignment=replicated (DiLoCo/FedAvg) has every node train every expert; use static"
                ),
            ),
            (
                _whole(self.assignment_every) and self.assignment_every >= 1,
                f"strategy.assignment_every must be an integer >= 1 (rounds), got {self.assignment_every!r}",
            ),
            (
                _finite(self.assignment_tolerance) and self.assignment_tolerance >= 0,
                f"strategy.assignment_tolerance must be >= 0, got {self.assignment_tolerance}",
            ),
        ]

    def quorum(self, num_nodes: int) -> int:
        return self.min_nodes or num_nodes

    @property
    def uplink(self) -> Codec:
        return Codec(self.uplink_codec, self.int8_block, int(self.topk_chunk), float(self.topk_fraction))

    @property
    def downlink(self) -> Codec:
        return Codec(self.downlink_codec, self.int8_block, int(self.topk_chunk), float(self.topk_fraction))


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_batches: int = 8  # held-out batches for the central evaluation after every round

    def validate(self) -> None:
        if self.batch_size < 1 or self.max_batches < 1:
            raise ValueError(
                f"eval.batch_size and eval.max_batches must be >= 1, got {self.batch_size} and {self.max_batches}"
            )


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "spes-flower"
    node_progress: bool = False  # per-step progress bars on the nodes, unless a node says otherwise


@dataclass
class RunSpec:
    model: MoEArgs
    data: DataConfig
    train: TrainConfig
    strategy: StrategyConfig
    eval: EvalConfig
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    strategy_name: str = "spes"
    run_name: str = "demo"
    output_dir: str = "outputs"
    seed: int = 0
    nodes: int = 4
    rounds: int = 30
    init_from: str | None = None
    resume: bool = False
    deterministic: bool = False
    engine: str = "flower"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.train.total_steps or self.rounds * self.strategy.local_steps

    def to_json(self) -> str:
        return json.dumps(self.raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ConfigError("run spec must be a JSON object")
        return from_dict(raw)


def _typed_top_level(raw: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key in TOP_LEVEL & set(raw):
        value, want = raw[key], TOP_LEVEL_TYPES.get(key)
        if want is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        if want is bool and not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        if want is str and not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        out[key] = value
    return out


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping of keys, got {value!r}")
    return dict(value)


def from_dict(raw: dict[str, Any]) -> RunSpec:
    """Typed spec with every value checked; raises ConfigError with one message naming the key."""
    try:
        unknown = sorted(set(raw) - TOP_LEVEL - SECTIONS)
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}")
        top = _typed_top_level(raw)
        strategy_raw = _section(raw, "strategy")
        eval_raw, logging_raw = _section(raw, "eval"), _section(raw, "logging")
        _check_fields("eval", EvalConfig, eval_raw)
        _check_fields("logging", LoggingConfig, logging_raw)
        spec = RunSpec(
            model=MoEArgs.from_dict(_section(raw, "model")),
            data=DataConfig.from_dict({**_section(raw, "data"), "seed": top.get("seed", 0)}),
            train=TrainConfig.from_dict(_section(raw, "train")),
            strategy=StrategyConfig.from_dict(strategy_raw),
            eval=EvalConfig(**eval_raw),
            logging=LoggingConfig(**logging_raw),
            strategy_name=str(strategy_raw.get("name", "spes")),
            raw=raw,
            **top,
        )
        validate(spec)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(str(exc)) from None
    return spec


def validate(spec: RunSpec) -> None:
    if spec.nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {spec.nodes}")
    if spec.engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {spec.engine!r}")
    if spec.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {spec.rounds}")
    if not spec.run_name or "/" in spec.run_name or spec.run_name in (".", ".."):
        raise ValueError(f"run_name must be a plain name (no '/'), got {spec.run_name!r}")
    spec.model.validate(seq_len=spec.data.seq_len)
    spec.data.validate()
    spec.train.validate()
    spec.eval.validate()
    spec.strategy.validate(spec.model.num_experts, spec.nodes)
    if spec.strategy.max_update_ratio and spec.train.lora_rank:
        raise ValueError(
            "strategy.max_update_ratio cannot be used with train.lora_rank > 0: LoRA's B matrices start at zero, "
            "so every honest change of them is an unbounded ratio; bound a LoRA run with strategy.max_abs_value "
            "or strategy.trim_fraction"
        )
    if spec.strategy.fragments > spec.model.num_layers:
        raise ValueError(
            f"strategy.fragments ({spec.strategy.fragments}) is more than model.num_layers "
            f"({spec.model.num_layers}): each fragment is a stride of layers"
        )
    if (
        spec.model.vocab_size is not None
        and spec.data.tokenizer == "bpe"
        and spec.model.vocab_size < spec.data.vocab_size
    ):
        raise ValueError(
            f"model.vocab_size ({spec.model.vocab_size}) is smaller than data.vocab_size ({spec.data.vocab_size})"
        )
