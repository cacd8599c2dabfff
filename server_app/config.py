"""The coordinator's side of the run config: Hydra composition and the checks only it can make.

Value checks live in `common.spec` (a node repeats them on what it receives); what depends on
the coordinator's own disk and environment — an `init_from` checkpoint, a data path, installed
logging packages, a writable output dir — is checked here, before Flower starts anything.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from common.errors import ConfigError
from common.spec import RunSpec, from_dict
from server_app.compose import CONF_DIR, available_presets, compose

__all__ = ["CONF_DIR", "ConfigError", "RunSpec", "available_presets", "compose", "load", "run_dir", "check_coordinator"]


def run_dir(spec: RunSpec) -> Path:
    return Path(spec.output_dir).expanduser().resolve() / spec.run_name


def _writable_dir(path: Path) -> bool:
    """Create the directory if needed and write a probe file there (permissions alone lie to root)."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".spes-write-probe-"):
            pass
    except OSError:
        return False
    return True


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub name (`org/name` has exactly one slash, no leading . / ~)."""
    return path.startswith(("/", ".", "~")) or path.count("/") != 1


def check_coordinator(spec: RunSpec) -> list[str]:
    """Checks against the coordinator's own disk and environment (raise ConfigError); returns data warnings."""
    if spec.init_from is not None and not Path(spec.init_from).expanduser().exists():
        raise ConfigError(f"init_from checkpoint {spec.init_from!r} does not exist")
    dense = spec.model.dense_path
    if spec.model.init == "upcycle" and dense and _looks_local(dense) and not Path(dense).expanduser().exists():
        raise ConfigError(f"model.dense_path {dense!r} does not exist (a hub name like 'Qwen/Qwen3-1.7B' is fine)")
    for enabled, module in ((spec.logging.tensorboard, "tensorboard"), (spec.logging.wandb, "wandb")):
        if enabled and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"logging.{module}=true but the {module!r} package is not installed (pip install {module})"
            )
    out = Path(spec.output_dir).expanduser()
    if not _writable_dir(out):
        raise ConfigError(f"output_dir {str(out)!r} is not a writable directory (or cannot be created)")
    from data import check_source

    try:
        warnings = check_source(spec.data)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return warnings


def load(overrides: list[str] | str = (), warn=None) -> RunSpec:
    """Composed, validated spec; data warnings (file, line) go to `warn` (default: stderr)."""
    import sys

    spec = from_dict(compose(overrides))
    for message in check_coordinator(spec):
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(message)
    return spec
