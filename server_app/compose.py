"""Composing the run config with Hydra, without torch: what `python -m sim --print-config` and the
fast refusal of a bad override need (server_app/config.py adds the typed spec and its checks).

An override of a key that does not exist gets the nearest existing keys ("did you mean"), not
Hydra's advice to force it in with `+`.
"""

from __future__ import annotations

import difflib
import shlex
from pathlib import Path
from typing import Any

from common.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def available_presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def config_groups() -> list[str]:
    """The preset groups a run can pick from (conf/<group>/<preset>.yaml)."""
    return sorted(
        p.name
        for p in CONF_DIR.iterdir()
        if p.is_dir() and any(p.glob("*.yaml")) and p.name != "bench" and p.name != "study"
    )


def compose(overrides: list[str] | str = ()) -> dict[str, Any]:
    """Compose conf/config.yaml with Hydra overrides into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    for ov in overrides:
        key, _, value = ov.partition("=")
        if (CONF_DIR / key).is_dir() and value and value not in available_presets(key) and value != "null":
            raise ConfigError(f"unknown {key} preset {value!r}; available: {', '.join(available_presets(key))}")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)
    except MissingConfigException as exc:
        raise ConfigError(f"bad config override: {exc}") from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(
            _unknown_key_message(overrides) or f"bad config override ({' '.join(overrides)}): {exc}"
        ) from None


def _flat_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out += _flat_keys(v, key) if isinstance(v, dict) else [key]
    return out


def _unknown_key_message(overrides: list[str]) -> str | None:
    """ "unknown key a.b; did you mean a.c?" for the first override naming a key the config lacks."""
    known = set(_flat_keys(compose([])))
    groups = set(config_groups())
    for ov in overrides:
        key = ov.partition("=")[0].lstrip("+~")
        if "=" not in ov or key in known or key in groups or any(k.startswith(key + ".") for k in known):
            continue
        close = difflib.get_close_matches(key, sorted(known | groups), n=3, cutoff=0.6)
        if close and difflib.SequenceMatcher(None, key, close[0]).ratio() >= 0.9:
            close = close[:1]  # one clear candidate
        hint = f"; did you mean {' or '.join(close)}?" if close else "; every key is listed in conf/config.yaml"
        return f"unknown key {key}{hint}"
    return None
