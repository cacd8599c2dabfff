"""Cheap whole-tensor checks that the node and the coordinator run on every tensor they receive.

`torch.isfinite(t).all()` allocates a boolean tensor as large as `t` and reads it back: at the
1b preset that was 4.3 s of a node's round on 2 CPU threads. One min/max reduction answers the
same question (NaN propagates through it, an infinity is its own min or max) without the
allocation: 0.025 s against 0.578 s for 10^8 floats here.
"""

from __future__ import annotations

import math

import torch


def value_range(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a floating tensor; NaN if it holds a NaN; (0, 0) if it is empty."""
    if t.numel() == 0:
        return 0.0, 0.0
    lo, hi = torch.aminmax(t.detach())
    return float(lo), float(hi)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t` (integer tensors always pass)."""
    if not t.is_floating_point():
        return True
    lo, hi = value_range(t)
    return math.isfinite(lo) and math.isfinite(hi)
