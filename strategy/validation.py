"""Checks that an update is well-formed before it touches the global model."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class InvalidUpdate(ValueError):
    pass


def validate_update(
    update: Mapping[str, torch.Tensor], expected: set[str], reference: Mapping[str, torch.Tensor]
) -> None:
    """Exactly the expected names, each with the global tensor's shape and dtype, all finite."""
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
        if not torch.isfinite(t).all():
            raise InvalidUpdate(f"{name}: contains NaN or Inf")
