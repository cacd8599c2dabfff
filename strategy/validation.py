"""Checks that a node's reply is well-formed before any of it touches the global model.

Everything a node sends is untrusted: tensors (names, shapes, dtypes, finite values, size of
the change) and metrics (types, ranges; a token count can be no larger than the round could
produce, since it weights the shared average).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from common import keys
from common.checks import value_range

METRIC_MAX = 1e15  # above any honest count, rate, size or time; keeps sums over nodes finite
MAX_TOKENS_PER_S = 1e8  # far above what one node trains per second
LOAD_ROW_TOLERANCE = 1e-3  # a layer's shares sum to 1 up to float32 rounding


class InvalidUpdate(ValueError):
    pass


def validate_update(
    update: Mapping[str, torch.Tensor],
    expected: set[str],
    reference: Mapping[str, torch.Tensor],
    max_abs_value: float = 0.0,
    max_update_ratio: float = 0.0,
) -> None:
    """Exactly the expected names, each with the global tensor's shape and dtype, all finite and bounded."""
    missing = expected - update.keys()
    extra = update.keys() - expected
    if missing or extra:
        raise InvalidUpdate(
            f"{len(missing)} expected parameter(s) missing (e.g. {sorted(missing)[:3]}), "
            f"{len(extra)} unexpected (e.g. {sorted(extra)[:3]})"
        )
    for name, t in update.items():
        ref = reference[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise InvalidUpdate(f"{name}: got {tuple(t.shape)} {t.dtype}, expected {tuple(ref.shape)} {ref.dtype}")
        lo, hi = value_range(t)
        if not math.isfinite(lo) or not math.isfinite(hi):
            raise InvalidUpdate(f"{name}: contains NaN or Inf")
        if max_abs_value and max(-lo, hi) > max_abs_value:
            raise InvalidUpdate(f"{name}: largest value {max(-lo, hi):.3g} exceeds {max_abs_value:g}")
        if max_update_ratio:
            change, norm = float((t.double() - ref.double()).norm()), float(ref.double().norm())
            if change > max_update_ratio * max(norm, 1e-6):
                raise InvalidUpdate(f"{name}: change {change:.3g} exceeds {max_update_ratio:g} x its norm {norm:.3g}")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InvalidUpdate(f"metric {key}={value!r} is not a finite number")
    if abs(float(value)) > METRIC_MAX:
        raise InvalidUpdate(f"metric {key}={value!r} is beyond {METRIC_MAX:g}")
    return float(value)


def validate_train_metrics(
    metrics: Mapping[str, Any], max_tokens: float, num_layers: int, num_experts: int
) -> dict[str, Any]:
    """Typed, range-checked copy of a node's training metrics (snake_case keys)."""
    out: dict[str, Any] = {}
    for key in keys.NODE_METRICS:
        if key in metrics:
            value = _number(metrics[key], key)
            if value < 0:
                raise InvalidUpdate(f"metric {key}={value} is negative")
            out[key.replace("-", "_")] = value
    if out.get("tokens_per_s", 0.0) > MAX_TOKENS_PER_S:
        raise InvalidUpdate(f"metric tokens-per-s={out['tokens_per_s']:g} is beyond {MAX_TOKENS_PER_S:g}")
    if keys.NUM_TOKENS not in metrics:
        raise InvalidUpdate(f"metric {keys.NUM_TOKENS} missing")
    if not 0 < out["num_tokens"] <= max_tokens:
        raise InvalidUpdate(
            f"num-tokens {out['num_tokens']:g} is outside (0, {max_tokens:g}] that this round can produce"
        )
    if keys.EXPERT_LOAD in metrics:
        load = metrics[keys.EXPERT_LOAD]
        if not isinstance(load, list) or len(load) != num_layers * num_experts:
            raise InvalidUpdate(f"metric expert-load must be a list of {num_layers} x {num_experts} numbers")
        values = [_number(x, keys.EXPERT_LOAD) for x in load]
        if any(not 0.0 <= x <= 1.0 for x in values):
            raise InvalidUpdate("metric expert-load holds fractions outside [0, 1]")
        rows = [values[i : i + num_experts] for i in range(0, len(values), num_experts)]
        sums = [sum(row) for row in rows]
        if any(abs(total - 1.0) > LOAD_ROW_TOLERANCE for total in sums):
            raise InvalidUpdate(f"metric expert-load: each layer's shares must sum to 1, got sums {sums}")
        out["expert_load"] = rows
    return out


def validate_eval_metrics(metrics: Mapping[str, Any], max_tokens: float) -> tuple[float, float]:
    loss = _number(metrics.get(keys.EVAL_LOSS), keys.EVAL_LOSS)
    tokens = _number(metrics.get(keys.NUM_TOKENS), keys.NUM_TOKENS)
    if loss < 0:
        raise InvalidUpdate(f"eval-loss {loss} is negative")
    if not 0 < tokens <= max_tokens:
        raise InvalidUpdate(f"eval num-tokens {tokens:g} outside (0, {max_tokens:g}]")
    return loss, tokens
