"""Tensors <-> Flower ArrayRecords, checked on the way in, and the byte accounting of what travels.

`encode`/`decode` carry whole fp32 tensors (the default, exact). With delta sync the arrays are
differences, compressed by a `Codec` (`encode_delta`/`decode_sync`): one Array per tensor named
`<tensor>#fp32` or `<tensor>#bf16` (bf16 bits as int16), or two for int8, `<tensor>#int8` (the
tensor's shape) and `<tensor>#int8-scale` (float32, one scale per block or row), or three for top-k (`topk2`, `topk4`:
`<tensor>#topk2` the packed values, `#topk2-index` the packed positions, `#topk2-scale` one float32
per chunk; format in `common.sparse`). A plain
`<tensor>` in the same record is a whole value (a resync). Flower carries each Array as numpy's
`.npy` bytes. `decode` never lets numpy guess: it parses the header itself,
refuses object dtypes, checks the header against the Array's declared dtype and shape (and
against the expected tensor, when the caller knows it) and requires the data to be exactly
as long as the header says, before anything is allocated. Nothing is ever unpickled.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from common import sparse

if TYPE_CHECKING:
    from flwr.app import Array, ArrayRecord


def _records():
    """Flower's record types, imported when a record is made or read: the codec's arithmetic
    and `common.spec` (which names the codecs) also serve the GPU benchmarks, run without Flower."""
    from flwr.app import Array, ArrayRecord

    return Array, ArrayRecord


NUMPY_STYPE = "numpy.ndarray"
_ALLOWED = {np.dtype(t) for t in ("float32", "float16", "float64", "int64", "int32", "int16", "uint8", "int8", "bool")}
CODECS = ("fp32", "bf16", "int8", "topk2", "topk4")
_TAG = "#"


class DecodeError(ValueError):
    """Bytes that are not exactly one well-formed array of the expected kind."""


def encode(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> ArrayRecord:
    keys = list(tensors) if names is None else list(names)
    Array, ArrayRecord = _records()
    return ArrayRecord({k: Array(tensors[k].detach().cpu().contiguous().numpy()) for k in keys})


def _parse(name: str, arr: Array) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) from the .npy header, checked against the declaration."""
    if not isinstance(arr, _records()[0]):
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


def decode(record: ArrayRecord, expected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of `record`; with `expected`, each must match that tensor's shape and dtype."""
    if not isinstance(record, _records()[1]):
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


def wire_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays as they travel (data plus each array's .npy header)."""
    return sum(len(arr.data) for arr in record.values())


# -- compressed deltas ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Codec:
    """How a difference tensor travels. Error bounds per element, for a block with largest |x| = m:
    fp32 exact; bf16 |err| <= |x| * 2**-8; int8 |err| <= m / 254 (round to nearest, scale m / 127);
    topk2/topk4: the kept entries |err| <= m / 4 and m / 16 (m the largest kept |x| of the chunk),
    every other entry dropped whole (error feedback sends it later)."""

    name: str = "fp32"
    block: int = 0  # int8: elements per scale; 0 = one scale per row (last dimension)
    chunk: int = 4096  # top-k: elements per chunk
    fraction: float = 1 / 64  # top-k: fraction of each chunk kept

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; choose one of {list(CODECS)}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0:
            raise ValueError(f"int8 block must be an integer >= 0 (0 = per row), got {self.block!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"top-k chunk must be an integer >= 1, got {self.chunk!r}")
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ValueError(f"top-k fraction must be in (0, 1], got {self.fraction!r}")

    @property
    def topk(self) -> sparse.TopK | None:
        """The sparse format, for the top-k codecs (else None)."""
        if not self.name.startswith("topk"):
            return None
        return sparse.TopK(self.chunk, float(self.fraction), int(self.name[4:]))

    def block_len(self, shape: tuple[int, ...]) -> int:
        numel = int(np.prod(shape, dtype=np.int64))
        if self.block:
            return self.block
        return max(int(shape[-1]) if shape else 1, 1) if numel else 1

    def num_blocks(self, shape: tuple[int, ...]) -> int:
        numel = int(np.prod(shape, dtype=np.int64))
        b = self.block_len(shape)
        return -(-numel // b)


def _int8(t: torch.Tensor, codec: Codec) -> tuple[np.ndarray, np.ndarray]:
    flat = t.detach().float().reshape(-1)
    b = codec.block_len(tuple(t.shape))
    nb = codec.num_blocks(tuple(t.shape))
    padded = torch.zeros(nb * b, dtype=torch.float32)
    padded[: flat.numel()] = flat
    blocks = padded.view(nb, b)
    scale = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[: flat.numel()].reshape(t.shape).numpy(), scale.numpy()


def _dequant_int8(q: torch.Tensor, scale: torch.Tensor, codec: Codec) -> torch.Tensor:
    shape = tuple(q.shape)
    b, nb = codec.block_len(shape), codec.num_blocks(shape)
    padded = torch.zeros(nb * b, dtype=torch.float32)
    padded[: q.numel()] = q.reshape(-1).float()
    return (padded.view(nb, b) * scale[:, None]).reshape(-1)[: q.numel()].reshape(shape)


def encode_delta(tensors: Mapping[str, torch.Tensor], codec: Codec) -> dict[str, np.ndarray]:
    """Named numpy arrays carrying `tensors` (differences) under `codec`."""
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        t = t.detach().cpu().float().contiguous()
        if codec.name == "fp32":
            out[f"{name}{_TAG}fp32"] = t.numpy()
        elif codec.name == "bf16":
            out[f"{name}{_TAG}bf16"] = t.to(torch.bfloat16).view(torch.int16).numpy()
        elif codec.topk is not None:
            tag = f"{name}{_TAG}{codec.name}"
            out[tag], out[f"{tag}-index"], out[f"{tag}-scale"] = sparse.pack(t, codec.topk)
        else:
            q, scale = _int8(t, codec)
            out[f"{name}{_TAG}int8"], out[f"{name}{_TAG}int8-scale"] = q, scale
    return out


def apply_delta(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """One move of a copy of the model: the same float32 expression on the coordinator and on
    every node, so their copies stay bit-equal."""
    return base + delta


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    Array, ArrayRecord = _records()
    # np.asarray keeps a 0-d array 0-d (ascontiguousarray would make it shape (1,)).
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def _view(name: str, arr: Array, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The Array's data as a numpy view, after checking it is exactly a `shape` `dtype` array."""
    got_shape, got_dtype, header_len = _parse(name, arr)
    if got_shape != tuple(shape) or got_dtype != np.dtype(dtype):
        raise DecodeError(f"{name}: got {got_shape} {got_dtype}, expected {tuple(shape)} {np.dtype(dtype)}")
    return np.frombuffer(arr.data, dtype=got_dtype, offset=header_len).reshape(shape)


def decode_sync(
    record: ArrayRecord, expected: Mapping[str, torch.Tensor], codec: Codec | Iterable[Codec]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(whole values, decoded differences) of a delta-sync record; every array is checked
    against the expected tensor of its name (shape, dtype, exact byte length, scale count,
    finite non-negative scales) before any memory is allocated for it. Differences are
    accepted only in the given codec(s) (a downlink may relay an uplink's arrays)."""
    allowed = {c.name: c for c in ([codec] if isinstance(codec, Codec) else codec)}
    if not isinstance(record, _records()[1]):
        raise DecodeError(f"arrays must be an ArrayRecord, got {type(record).__name__}")
    groups: dict[str, dict[str, Array]] = {}
    for key, arr in record.items():
        name, _, kind = key.partition(_TAG)
        groups.setdefault(name, {})[kind] = arr
    full: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        ref = expected.get(name)
        if ref is None:
            raise DecodeError(f"{name}: not a parameter of this model")
        shape = tuple(ref.shape)
        kinds = set(parts)
        if kinds == {""}:
            full[name] = torch.from_numpy(_view(name, parts[""], shape, "float32").copy())
        elif kinds == {"fp32"} and "fp32" in allowed:
            deltas[name] = torch.from_numpy(_view(f"{name}#fp32", parts["fp32"], shape, "float32").copy())
        elif kinds == {"bf16"} and "bf16" in allowed:
            bits = _view(f"{name}#bf16", parts["bf16"], shape, "int16")
            deltas[name] = torch.from_numpy(bits.copy()).view(torch.bfloat16).float()
        elif kinds == {"int8", "int8-scale"} and "int8" in allowed:
            codec = allowed["int8"]
            scale = _view(f"{name}#int8-scale", parts["int8-scale"], (codec.num_blocks(shape),), "float32")
            if not (np.isfinite(scale).all() and (scale >= 0).all()):
                raise DecodeError(f"{name}#int8-scale: scales must be finite and >= 0")
            q = _view(f"{name}#int8", parts["int8"], shape, "int8")
            deltas[name] = _dequant_int8(torch.from_numpy(q.copy()), torch.from_numpy(scale.copy()), codec)
        elif len(kinds) == 3 and (topk := _topk_of(kinds, allowed)) is not None:
            deltas[name] = _decode_topk(name, parts, shape, topk)
        else:
            raise DecodeError(
                f"{name}: arrays {sorted(k or '(whole)' for k in kinds)} are not a "
                f"{'/'.join(allowed)} delta or a whole value"
            )
    return full, deltas


def _topk_of(kinds: set[str], allowed: Mapping[str, Codec]) -> Codec | None:
    """The allowed top-k codec whose three arrays `kinds` are, if any."""
    for name, codec in allowed.items():
        if codec.topk is not None and kinds == {name, f"{name}-index", f"{name}-scale"}:
            return codec
    return None


def _decode_topk(name: str, parts: Mapping[str, Array], shape: tuple[int, ...], codec: Codec) -> torch.Tensor:
    fmt = codec.topk
    value_bytes, index_bytes, scales = sparse.sizes(int(np.prod(shape, dtype=np.int64)), fmt)
    tag = f"{name}{_TAG}{codec.name}"
    values = _view(tag, parts[codec.name], (value_bytes,), "uint8")
    index = _view(f"{tag}-index", parts[f"{codec.name}-index"], (index_bytes,), "uint8")
    scale = _view(f"{tag}-scale", parts[f"{codec.name}-scale"], (scales,), "float32")
    try:
        return sparse.unpack(values, index, scale, shape, fmt)
    except sparse.SparseFormatError as exc:
        raise DecodeError(f"{tag}: {exc}") from None


def decode_delta(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, torch.Tensor], codec: Codec
) -> dict[str, torch.Tensor]:
    """Decoded differences of locally produced arrays (the same arithmetic as `decode_sync`)."""
    full, deltas = decode_sync(to_record(arrays), expected, codec)
    if full:
        raise DecodeError(f"whole values where differences were expected: {sorted(full)[:3]}")
    return deltas
