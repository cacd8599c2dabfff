"""Tensors <-> Flower ArrayRecords, checked on the way in, and the byte accounting of what travels.

fp32 only for now; a bf16/int8 codec later replaces `encode`/`decode`. Flower carries each
Array as numpy's `.npy` bytes. `decode` never lets numpy guess: it parses the header itself,
refuses object dtypes, checks the header against the Array's declared dtype and shape (and
against the expected tensor, when the caller knows it) and requires the data to be exactly
as long as the header says, before anything is allocated. Nothing is ever unpickled.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"
_ALLOWED = {np.dtype(t) for t in ("float32", "float16", "float64", "int64", "int32", "uint8", "int8", "bool")}


class DecodeError(ValueError):
    """Bytes that are not exactly one well-formed array of the expected kind."""


def encode(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> ArrayRecord:
    keys = list(tensors) if names is None else list(names)
    return ArrayRecord({k: Array(tensors[k].detach().cpu().contiguous().numpy()) for k in keys})


def _parse(name: str, arr: Array) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) from the .npy header, checked against the declaration."""
    if not isinstance(arr, Array):
        raise DecodeError(f"{name}: not an Array ({type(arr).__name__})")
    if arr.stype != NUMPY_STYPE:
        raise DecodeError(f"{name}: serialisation {arr.stype!r}, expected {NUMPY_STYPE!r}")
    data = arr.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"{name}: data is {type(data).__name__}, not bytes")
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf, max_header_size=10_000)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf, max_header_size=10_000)
        else:
            raise DecodeError(f"{name}: unsupported .npy version {version}")
    except DecodeError:
        raise
    except Exception as exc:  # numpy raises ValueError/EOFError/SyntaxError on a broken header
        raise DecodeError(f"{name}: broken .npy header ({type(exc).__name__}: {exc})") from None
    if fortran:
        raise DecodeError(f"{name}: Fortran-ordered arrays are not accepted")
    if dtype not in _ALLOWED or dtype.hasobject:
        raise DecodeError(f"{name}: dtype {dtype} is not accepted")
    if tuple(shape) != tuple(arr.shape) or str(dtype) != str(arr.dtype):
        raise DecodeError(
            f"{name}: header says {tuple(shape)} {dtype}, the Array declares {tuple(arr.shape)} {arr.dtype}"
        )
    header_len = buf.tell()
    want = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != want:
        raise DecodeError(f"{name}: {len(data)} bytes, a {tuple(shape)} {dtype} array takes exactly {want}")
    return tuple(shape), dtype, header_len


def decode(
    record: ArrayRecord, expected: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of `record`; with `expected`, each must match that tensor's shape and dtype."""
    if not isinstance(record, ArrayRecord):
        raise DecodeError(f"arrays must be an ArrayRecord, got {type(record).__name__}")
    out = {}
    for name, arr in record.items():
        shape, dtype, header_len = _parse(name, arr)
        if expected is not None:
            ref = expected.get(name)
            if ref is None:
                raise DecodeError(f"{name}: not a parameter of this model")
            ref_dtype = torch.empty((), dtype=ref.dtype).numpy().dtype
            if shape != tuple(ref.shape) or dtype != ref_dtype:
                raise DecodeError(f"{name}: got {shape} {dtype}, expected {tuple(ref.shape)} {ref_dtype}")
        flat = np.frombuffer(arr.data, dtype=dtype, offset=header_len)
        out[name] = torch.from_numpy(flat.reshape(shape).copy())
    return out


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data (numel * itemsize), excluding numpy's ~128-byte header per array."""
    total = 0
    for arr in record.values():
        total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    return total


def tensor_bytes(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> int:
    return sum(tensors[n].numel() * tensors[n].element_size() for n in names)
