"""Top-k differences quantised to 2 or 4 bits (SparseLoCo, arXiv 2508.15706), as three byte arrays.

A tensor is flattened and cut into chunks of `chunk` elements (the last one may be shorter). In
a chunk of length L the k = ceil(fraction * L) entries of largest magnitude are kept, the others
are sent as zero (error feedback carries them to the next round). Per chunk:

  - scale    m = max |kept value|, float32;
  - values   each kept v as q = clamp(floor((v / m + 1) * 2**(b-1)), 0, 2**b - 1), decoded as
             ((q + 0.5) / 2**(b-1) - 1) * m: 2**b levels, none at zero (a kept entry is large),
             |error| <= m / 2**b;
  - positions either a bitmap of L bits or the k positions in ascending order, w = ceil(log2 L)
             bits each, whichever takes fewer bits (both follow from L and k, so no flag travels).

Values and positions of each chunk start on a byte boundary and are packed least significant
bit first. `unpack` checks what a hostile sender controls (byte counts, positions in range and
strictly ascending, a bitmap with exactly k bits set, finite non-negative scales) before it
builds the tensor, whose size is the receiver's own expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BITS = (2, 4)


class SparseFormatError(ValueError):
    """Arrays that are not a well-formed top-k encoding of the expected tensor."""


@dataclass(frozen=True)
class TopK:
    """The format: chunk length, fraction of each chunk kept, bits per kept value."""

    chunk: int = 4096
    fraction: float = 1 / 64
    bits: int = 2


@dataclass(frozen=True)
class Rows:
    """Consecutive chunks of one length: `count` chunks of `length` elements from `start`."""

    start: int
    count: int
    length: int
    keep: int  # k, entries kept per chunk

    @property
    def position_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.length)))

    @property
    def bitmap(self) -> bool:
        return self.length <= self.keep * self.position_bits

    def value_bytes(self, bits: int) -> int:
        return -(-self.keep * bits // 8)

    def position_bytes(self) -> int:
        return -(-(self.length if self.bitmap else self.keep * self.position_bits) // 8)


def layout(numel: int, fmt: TopK) -> list[Rows]:
    """The chunks of a `numel`-element tensor: the full ones, then the shorter last one."""
    full, rest = divmod(numel, fmt.chunk)
    groups = [Rows(0, full, fmt.chunk, _keep(fmt.chunk, fmt.fraction))] if full else []
    if rest:
        groups.append(Rows(full * fmt.chunk, 1, rest, _keep(rest, fmt.fraction)))
    return groups


def _keep(length: int, fraction: float) -> int:
    return min(length, max(1, math.ceil(fraction * length)))


def sizes(numel: int, fmt: TopK) -> tuple[int, int, int]:
    """(value bytes, position bytes, scales) that a `numel`-element tensor encodes to."""
    groups = layout(numel, fmt)
    return (
        sum(g.count * g.value_bytes(fmt.bits) for g in groups),
        sum(g.count * g.position_bytes() for g in groups),
        sum(g.count for g in groups),
    )


def _to_bits(x: np.ndarray, width: int) -> np.ndarray:
    """[n, k] non-negative integers -> [n, ceil(k * width / 8)] bytes, little-endian bit order."""
    bits = (x[..., None] >> np.arange(width, dtype=x.dtype)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(len(x), -1), axis=1, bitorder="little")


def _from_bits(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of `_to_bits`: [n, bytes] -> [n, count] int64."""
    bits = np.unpackbits(packed, axis=1, count=count * width, bitorder="little").astype(np.int64)
    return (bits.reshape(len(packed), count, width) << np.arange(width, dtype=np.int64)).sum(axis=2)


def pack(t: torch.Tensor, fmt: TopK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values uint8, positions uint8, scales float32) of `t` (any shape, float32)."""
    flat = t.detach().cpu().float().reshape(-1)
    values, positions, scales = [np.zeros(0, np.uint8)], [np.zeros(0, np.uint8)], [np.zeros(0, np.float32)]
    half = 2 ** (fmt.bits - 1)
    for g in layout(flat.numel(), fmt):
        x = flat[g.start : g.start + g.count * g.length].view(g.count, g.length)
        idx = torch.topk(x.abs(), g.keep, dim=1, sorted=False).indices.sort(dim=1).values
        kept = torch.gather(x, 1, idx)
        m = kept.abs().amax(dim=1)
        q = torch.floor((kept / torch.where(m > 0, m, 1.0)[:, None] + 1) * half).clamp_(0, 2 * half - 1)
        values.append(_to_bits(q.to(torch.int64).numpy(), fmt.bits).reshape(-1))
        if g.bitmap:
            mask = np.zeros((g.count, g.length), dtype=np.uint8)
            np.put_along_axis(mask, idx.numpy(), 1, axis=1)
            positions.append(np.packbits(mask, axis=1, bitorder="little").reshape(-1))
        else:
            positions.append(_to_bits(idx.numpy(), g.position_bits).reshape(-1))
        scales.append(m.numpy())
    return np.concatenate(values), np.concatenate(positions), np.concatenate(scales).astype(np.float32)


def unpack(values: np.ndarray, positions: np.ndarray, scales: np.ndarray, shape: tuple[int, ...], fmt: TopK):
    """The float32 tensor of `shape` that `pack` encoded, after checking every field."""
    numel = int(np.prod(shape, dtype=np.int64))
    want, got = sizes(numel, fmt), (values.size, positions.size, scales.size)
    if got != want:
        raise SparseFormatError(f"(value bytes, position bytes, scales) = {got}, a {shape} tensor takes {want}")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise SparseFormatError("scales must be finite and >= 0")
    out = torch.zeros(numel, dtype=torch.float32)
    v_at = p_at = s_at = 0
    for g in layout(numel, fmt):
        vb, pb = g.value_bytes(fmt.bits), g.position_bytes()
        idx = _positions(positions[p_at : p_at + g.count * pb].reshape(g.count, pb), g)
        q = torch.from_numpy(_from_bits(values[v_at : v_at + g.count * vb].reshape(g.count, vb), g.keep, fmt.bits))
        m = torch.from_numpy(scales[s_at : s_at + g.count].astype(np.float32))
        kept = ((q.float() + 0.5) / 2 ** (fmt.bits - 1) - 1) * m[:, None]
        out[g.start : g.start + g.count * g.length].view(g.count, g.length).scatter_(1, torch.from_numpy(idx), kept)
        v_at, p_at, s_at = v_at + g.count * vb, p_at + g.count * pb, s_at + g.count
    return out.reshape(shape)


def _positions(packed: np.ndarray, g: Rows) -> np.ndarray:
    """[count, keep] int64 positions of each chunk, checked in range and strictly ascending."""
    if g.bitmap:
        mask = np.unpackbits(packed, axis=1, count=g.length, bitorder="little")
        counts = mask.sum(axis=1)
        if (counts != g.keep).any():
            bad = int(np.flatnonzero(counts != g.keep)[0])
            raise SparseFormatError(f"chunk {bad}: bitmap marks {int(counts[bad])} positions, expected {g.keep}")
        return np.nonzero(mask)[1].reshape(g.count, g.keep).astype(np.int64)
    idx = _from_bits(packed, g.keep, g.position_bits)
    if (idx >= g.length).any():
        raise SparseFormatError(f"a position is >= the chunk length {g.length}")
    if g.keep > 1 and (np.diff(idx, axis=1) <= 0).any():
        raise SparseFormatError("positions within a chunk must be strictly ascending (sorted, unique)")
    return idx
