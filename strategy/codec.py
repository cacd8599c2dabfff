"""Tensors <-> Flower ArrayRecords, and the byte accounting of what travels.

fp32 only for now; a bf16/int8 codec later replaces these two functions. Flower serialises
each Array with numpy's `save(allow_pickle=False)`, so nothing that arrives is unpickled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def encode(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> ArrayRecord:
    keys = list(tensors) if names is None else list(names)
    return ArrayRecord({k: Array(tensors[k].detach().cpu().contiguous().numpy()) for k in keys})


def decode(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(arr.numpy(), copy=True)) for k, arr in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data (numel * itemsize), excluding numpy's ~128-byte header per array."""
    total = 0
    for arr in record.values():
        total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    return total


def tensor_bytes(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> int:
    return sum(tensors[n].numel() * tensors[n].element_size() for n in names)
