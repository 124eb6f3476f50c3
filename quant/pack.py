"""Bit packing of the package format (see docs/numerics.md, "Quantization formats").

* ``pack_bits(codes, b)``: unsigned b-bit codes, row-major, packed LSB-first into a little-endian
  bit stream: element i occupies stream bits [i*b, i*b+b), stream bit j is bit (j % 8) of byte j // 8.
  Element 0 sits in the least significant bits of byte 0; 3-bit codes straddle byte boundaries.
  The last byte is zero-padded.
* 2:4 sparsity: each group of 4 columns keeps 2 codes (ascending column order) and a 3-bit pattern
  index into ``PATTERNS_24`` (the 6 kept column pairs in lexicographic order).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from algo.common import AccllmError

PATTERNS_24 = list(itertools.combinations(range(4), 2))   # (0,1),(0,2),(0,3),(1,2),(1,3),(2,3)
_PATTERN_INDEX = {p: i for i, p in enumerate(PATTERNS_24)}


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes, bits: int) -> np.ndarray:
    """Pack unsigned integers (< 2**bits, any shape, row-major) into a 1-D uint8 array."""
    if not 1 <= bits <= 8:
        raise AccllmError(f"cannot pack {bits}-bit codes; 1..8 bits are supported")
    a = _np(codes).astype(np.int64).ravel()
    if a.size and (a.min() < 0 or a.max() >= (1 << bits)):
        raise AccllmError(f"codes out of range for {bits} bits: [{a.min()}, {a.max()}]")
    if bits == 8:
        return a.astype(np.uint8)
    bitmat = ((a[:, None] >> np.arange(bits)) & 1).astype(np.uint8)      # [n, bits], LSB first
    return np.packbits(bitmat.ravel(), bitorder="little")


def unpack_bits(data, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first *count* b-bit codes of *data* (1-D uint8) as uint8."""
    d = _np(data).astype(np.uint8).ravel()
    if d.size < packed_nbytes(count, bits):
        raise AccllmError(f"packed tensor has {d.size} bytes, {packed_nbytes(count, bits)} needed for "
                          f"{count} {bits}-bit codes")
    if bits == 8:
        return d[:count].copy()
    bitstream = np.unpackbits(d, bitorder="little")[: count * bits].reshape(count, bits).astype(np.uint16)
    return (bitstream << np.arange(bits, dtype=np.uint16)).sum(axis=1).astype(np.uint8)


def encode_24(codes, mask) -> tuple[np.ndarray, np.ndarray]:
    """Split dense codes [N, K] with a 2:4 *mask* (True = kept, exactly 2 per group of 4) into
    (kept codes [N, K/2], pattern indices [N, K/4] in 0..5)."""
    c = _np(codes)
    m = _np(mask).astype(bool)
    n, k = c.shape
    if k % 4:
        raise AccllmError(f"2:4 sparsity needs K divisible by 4, got K={k}")
    mg = m.reshape(n, k // 4, 4)
    if not (mg.sum(-1) == 2).all():
        raise AccllmError("mask is not 2:4: every group of 4 columns must keep exactly 2")
    # Pattern index from the 4-bit mask: bits (a, b) kept with a < b.
    code4 = (mg * (1 << np.arange(4))).sum(-1)
    lut = np.full(16, 255, dtype=np.uint8)
    for i, (a, b) in enumerate(PATTERNS_24):
        lut[(1 << a) | (1 << b)] = i
    idx = lut[code4]
    kept = c.reshape(n, k // 4, 4)[mg].reshape(n, k // 2)   # boolean indexing keeps ascending order
    return kept, idx


def decode_24(kept, idx, k: int, fill) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_24`: (dense codes [N, K] with *fill* [N, K] at pruned positions,
    mask [N, K])."""
    kept = _np(kept)
    idx = _np(idx).astype(np.int64)
    n = kept.shape[0]
    if idx.size and idx.max() >= len(PATTERNS_24):
        raise AccllmError(f"2:4 pattern index {idx.max()} out of range 0..5")
    pats = np.array(PATTERNS_24)                                       # [6, 2]
    cols = pats[idx] + (np.arange(k // 4) * 4)[None, :, None]          # [N, K/4, 2]
    mask = np.zeros((n, k), dtype=bool)
    rows = np.arange(n)[:, None, None]
    mask[rows, cols] = True
    dense = np.array(_np(fill), copy=True)
    dense[rows, cols] = kept.reshape(n, k // 4, 2)
    return dense, mask
