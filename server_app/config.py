"""The run configuration: Hydra composition, typed sections, validation before any training.

The coordinator composes the config once (from the Hydra overrides carried in the Flower
run-config) and sends the resolved result to every node, so nodes never compose it themselves
and all of them train with exactly the same settings.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client_app.trainer import TrainConfig
from data.pipeline import DataConfig
from model.args import MoEArgs
from strategy.spes import SpesConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_TOP_LEVEL = {
    "run_name", "output_dir", "seed", "nodes", "rounds", "init_from", "node_work_dir", "round_timeout_s",
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_batches: int = 8


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "spes-flower"

    def validate(self) -> None:
        import importlib.util

        for enabled, module, pkg in ((self.tensorboard, "tensorboard", "tensorboard"), (self.wandb, "wandb", "wandb")):
            if enabled and importlib.util.find_spec(module) is None:
                raise ValueError(f"logging.{pkg}=true but the {pkg!r} package is not installed (pip install {pkg})")


@dataclass
class RunSpec:
    model: MoEArgs
    data: DataConfig
    train: TrainConfig
    strategy: SpesConfig
    eval: EvalConfig
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    strategy_name: str = "spes"
    run_name: str = "demo"
    output_dir: str = "outputs"
    seed: int = 0
    nodes: int = 4
    rounds: int = 40
    init_from: str | None = None
    node_work_dir: str | None = None
    round_timeout_s: float = 3600
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.train.total_steps or self.rounds * self.strategy.local_steps

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.run_name

    def to_json(self) -> str:
        return json.dumps(self.raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return from_dict(json.loads(text))


def available_presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(overrides: list[str] | str = ()) -> dict[str, Any]:
    """Compose conf/config.yaml with Hydra overrides into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf

    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key in ("model", "strategy") and value and value not in available_presets(key):
            raise ConfigError(f"unknown {key} preset {value!r}; available: {', '.join(available_presets(key))}")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except MissingConfigException as exc:
        raise ConfigError(f"bad config override: {exc}") from None
    except HydraException as exc:
        raise ConfigError(f"bad config override ({' '.join(overrides)}): {exc}") from None
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(raw: dict[str, Any]) -> RunSpec:
    """Typed, validated run spec; raises ConfigError with one clear message."""
    try:
        unknown = sorted(set(raw) - _TOP_LEVEL - {"model", "data", "train", "strategy", "eval", "logging"})
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}")
        strategy_raw = dict(raw["strategy"])
        strategy_name = strategy_raw.get("name", "spes")
        spec = RunSpec(
            model=MoEArgs.from_dict(raw["model"]),
            data=DataConfig.from_dict({**raw["data"], "seed": raw.get("seed", 0)}),
            train=TrainConfig.from_dict(raw["train"]),
            strategy=SpesConfig.from_dict(strategy_raw),
            eval=EvalConfig(**raw.get("eval", {})),
            logging=LoggingConfig(**raw.get("logging", {})),
            strategy_name=strategy_name,
            raw=raw,
            **{k: raw[k] for k in _TOP_LEVEL if k in raw},
        )
        validate(spec)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    return spec


def validate(spec: RunSpec) -> None:
    if spec.nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {spec.nodes}")
    if spec.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {spec.rounds}")
    spec.model.validate()
    spec.data.validate()
    spec.train.validate()
    spec.logging.validate()
    spec.strategy.validate(spec.model.num_experts, spec.nodes)
    if spec.model.vocab_size is not None and spec.data.tokenizer == "bpe" and spec.model.vocab_size < spec.data.vocab_size:
        raise ValueError(
            f"model.vocab_size ({spec.model.vocab_size}) is smaller than data.vocab_size ({spec.data.vocab_size})"
        )
    if spec.init_from is not None and not Path(spec.init_from).expanduser().exists():
        raise ValueError(f"init_from checkpoint {spec.init_from!r} does not exist")


def load(overrides: list[str] | str = ()) -> RunSpec:
    return from_dict(compose(overrides))
