"""The single executable specification of every integer / fixed-point operation of the accelerator.

numpy, integers only (int64 intermediates). The functional model (sim/emu.py), the compiler
(hw/compiler.py) and every RTL test use these functions; docs/numerics.md writes them up. Nothing
the RTL computes uses floating point; the compiler converts the package's fp16 constants into the
hardware forms defined here (``scales_to_hw``, ``fp16_to_q16`` ...).

Conventions
-----------
* ``X32``: activations as int32 two's complement, Q16.16 fixed point (value = int / 2**16).
* ``X8``: int8 codes in [-127, 127] per token plus a token scale word ``ma | ea << 16``
  (``ma`` <= 2**15, ``ea`` >= 0): value = code * (ma * 2**ea) / 127 / 2**16.
* Rounding: every right shift by s > 0 that rounds is *round half up* by add-and-shift,
  ``(x + (1 << (s - 1))) >> s`` with an arithmetic shift (two's complement floor), so -2.5 -> -2.
* Saturation: ``sat(x, bits)`` clamps to the signed range [-(2**(bits-1)), 2**(bits-1) - 1];
  int8 activation codes clamp to the symmetric [-127, 127].
"""
from __future__ import annotations

import numpy as np

from algo.common import AccllmError

FRAC = 16                      # Q16.16 activations
ACT_QMAX = 127                 # symmetric int8 activation codes
MA_BITS = 15                   # token-scale mantissa bits (ma <= 2**15)
ACC_BITS = 48                  # matrix-engine row accumulator (saturating)
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def sat(x, bits: int) -> np.ndarray:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.clip(np.asarray(x, dtype=np.int64), lo, hi)


def rshift_round(x, s) -> np.ndarray:
    """Round-half-up arithmetic shift right by *s* (array or scalar, s >= 0; s == 0 is identity)."""
    x = np.asarray(x, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    if np.any(s < 0):
        raise ValueError("rshift_round needs s >= 0")
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
    return np.right_shift(x + half, s)


def shift_sat32(y, r) -> np.ndarray:
    """y * 2**-r with round half up for r > 0, left shift for r <= 0; saturated to int32."""
    y = np.asarray(y, dtype=np.int64)
    r = np.broadcast_to(np.asarray(r, dtype=np.int64), y.shape)
    right = rshift_round(y, np.clip(r, 0, 62))
    ls = np.clip(-r, 0, 31)
    left = np.left_shift(np.clip(y, I32_MIN, I32_MAX), ls)
    return sat(np.where(r > 0, right, left), 32)


def bitlen(x) -> np.ndarray:
    """Number of bits of non-negative integers (0 -> 0), exact for int64."""
    x = np.asarray(x, dtype=np.int64)
    out = np.zeros(x.shape, dtype=np.int64)
    v = x.copy()
    for s in (32, 16, 8, 4, 2, 1):
        m = v >= (np.int64(1) << s)
        out += np.where(m, s, 0)
        v = np.where(m, v >> s, v)
    return out + (v > 0)


def fp16_parts(x) -> tuple[np.ndarray, np.ndarray]:
    """fp16 values as exact (m, e) with value = m * 2**e, m a signed integer |m| < 2**11."""
    h = np.asarray(x, dtype=np.float16)
    bits = h.view(np.uint16).astype(np.int64)
    sign = np.where(bits >> 15, -1, 1)
    ex = (bits >> 10) & 0x1F
    fr = bits & 0x3FF
    if np.any(ex == 0x1F):
        raise AccllmError("fp16 constant is inf or NaN; the hardware forms accept finite values only")
    m = np.where(ex == 0, fr, fr | 0x400) * sign
    e = np.where(ex == 0, -24, ex - 25)
    return m, e


def fp16_to_q16(x) -> np.ndarray:
    """fp16 -> int32 Q16.16, round half up, saturated (used for embeddings, RMSNorm gamma)."""
    m, e = fp16_parts(x)
    t = e + FRAC                        # value*2^16 = m * 2^t
    pos = np.left_shift(m, np.clip(t, 0, 40))
    neg = rshift_round(m, np.clip(-t, 0, 62))
    return sat(np.where(t >= 0, pos, neg), 32)


# --------------------------------------------------------------------------------------------------
# activation quantization (SFU tail of RMSNORM / SILUMUL / ATTN / QUANT)
# --------------------------------------------------------------------------------------------------
def act_quant(v) -> tuple[np.ndarray, np.ndarray]:
    """X32 rows [T, D] -> (int8 codes [T, D] in [-127, 127], token scale words [T]).

    amax = max|v| per row (>= 1); ea = max(0, bitlen(amax) - 15); ma = ceil(amax / 2**ea) <= 2**15;
    A = ma << ea >= amax; one reciprocal per token R = floor((127 << 32) / A);
    code = clamp((v * R + 2**31) >> 32, -127, 127)   (|v * R| <= 127 * 2**32 < 2**39).
    Token scale word = ma | ea << 16; the value of a code is code * A / 127 / 2**16.
    """
    v = np.asarray(v, dtype=np.int64)
    amax = np.maximum(np.abs(v).max(axis=-1), 1)
    ea = np.maximum(bitlen(amax) - MA_BITS, 0)
    ma = ((amax - 1) >> ea) + 1
    A = ma << ea
    R = (np.int64(ACT_QMAX) << 32) // A
    codes = np.clip((v * R[..., None] + (1 << 31)) >> 32, -ACT_QMAX, ACT_QMAX).astype(np.int8)
    return codes, (ma | (ea << 16)).astype(np.int64)


def scale_word_parts(words) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(words, dtype=np.int64)
    return w & 0xFFFF, (w >> 16) & 0xFF


def act_dequant(codes, words) -> np.ndarray:
    """float64 value of X8 (for tests and reports only; the hardware never does this)."""
    ma, ea = scale_word_parts(words)
    return np.asarray(codes, np.float64) * (ma * 2.0 ** ea)[..., None] / ACT_QMAX / 2.0 ** FRAC


# --------------------------------------------------------------------------------------------------
# matrix engine
# --------------------------------------------------------------------------------------------------
def scales_to_hw(scales_fp16, scale_bits: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Package scales fp16 [N, G] -> (mantissas M uint [N, G] < 2**scale_bits, row shifts SH int [N]).

    The hardware weight scale of group g of row n is s[n, g] / 127 = M[n, g] * 2**-SH[n] (the 1/127
    of the activation scale is folded in here). M = round_half_up(s * 2**SH / 127) computed exactly
    from the fp16 bits; SH[n] is the largest shift in [-64, 63] with max_g M[n, g] < 2**scale_bits.
    Loss: relative error <= 2**-scale_bits * 2 of the row's largest scale per group (16 bits: below
    fp16's own resolution for groups within 2**4 of the row maximum).
    """
    s = np.asarray(scales_fp16, dtype=np.float16)
    if s.ndim != 2:
        raise AccllmError(f"scales must be [N, groups], got shape {s.shape}")
    if np.any(s.astype(np.float32) < 0):
        raise AccllmError("weight scales must be non-negative")
    m, e = fp16_parts(s)
    lim = (1 << scale_bits) - 1
    smax = s.astype(np.float64).max(axis=1)
    smax = np.where(smax > 0, smax, 2.0 ** -24)
    sh = np.floor(np.log2(lim * ACT_QMAX / smax)).astype(np.int64) + 1
    sh = np.clip(sh, -64, 63)
    for _ in range(4):      # exact fix-up of the float estimate
        M = _scale_mant(m, e, sh[:, None])
        over = M.max(axis=1) > lim
        if not over.any():
            break
        sh = np.where(over, sh - 1, sh)
    M = _scale_mant(m, e, sh[:, None])
    if (M.max(axis=1) > lim).any():
        raise AccllmError("weight scales too large for the hardware scale format (shift range [-64, 63])")
    return M.astype(np.int64), sh.astype(np.int64)


def _scale_mant(m, e, sh):
    t = e + sh                                   # M = round_half_up(m * 2^t / 127)
    tp = np.clip(t, 0, 40)
    num_pos = ((2 * m) << tp) + 127
    res_pos = num_pos // 254
    tn = np.clip(-t, 0, 40)
    num_neg = 2 * m + (np.int64(127) << tn)
    res_neg = num_neg // (np.int64(254) << tn)
    out = np.where(t >= 0, res_pos, res_neg)
    return np.where(t < -40, 0, out)


def weight_diff(codes, zeros, group: int, mask=None) -> np.ndarray:
    """d[n, k] = code[n, k] - zero[n, k // group] (int, |d| < 2**bits); exactly 0 where pruned."""
    c = np.asarray(codes, dtype=np.int64)
    z = np.repeat(np.asarray(zeros, dtype=np.int64), group, axis=1)
    d = c - z
    if mask is not None:
        d = np.where(np.asarray(mask, bool), d, 0)
    return d


def group_sums(x8, d, group: int) -> np.ndarray:
    """G[t, n, g] = sum over k in group g of d[n, k] * x[t, k] (exact integers, |G| < 2**22)."""
    x = np.asarray(x8, dtype=np.int64)
    T, K = x.shape
    N = d.shape[0]
    return np.einsum("tgk,ngk->tng", x.reshape(T, K // group, group), d.reshape(N, K // group, group))


def matmul_finish(G, M, SH, scale_words, dst=None) -> np.ndarray:
    """From group sums to the X32 output.

    acc[t, n] = sat48(sum_g G[t, n, g] * M[n, g])        (|G*M| < 2**38, exact in int64)
    y = acc * ma[t]                                        (|y| < 2**62)
    out = sat32(round_half_up(y * 2**-(SH[n] - ea[t])))     (left shift if SH - ea <= 0)
    with F_ACC: out = sat32(dst + out).
    """
    acc = np.einsum("tng,ng->tn", np.asarray(G, np.int64), np.asarray(M, np.int64))
    acc = sat(acc, ACC_BITS)
    ma, ea = scale_word_parts(scale_words)
    y = acc * ma[:, None]
    out = shift_sat32(y, np.asarray(SH, np.int64)[None, :] - ea[:, None])
    if dst is not None:
        out = sat(np.asarray(dst, np.int64) + out, 32)
    return out


def matmul(x8, scale_words, codes, zeros, M, SH, group: int, mask=None, dst=None) -> np.ndarray:
    """Straightforward reference of the whole matrix-engine operation (X8 [T,K] -> X32 [T,N])."""
    x8 = np.asarray(x8)
    K = x8.shape[1]
    if K % group:
        raise AccllmError(f"K={K} is not a multiple of the group {group}")
    d = weight_diff(codes, zeros, group, mask)
    return matmul_finish(group_sums(x8, d, group), M, SH, scale_words, dst)


def hw_weight_value(codes, zeros, M, SH, group: int, mask=None) -> np.ndarray:
    """float64 weight the hardware effectively multiplies by (times 127 for the activation scale)."""
    d = weight_diff(codes, zeros, group, mask).astype(np.float64)
    sc = np.repeat(np.asarray(M, np.float64), group, axis=1) * (2.0 ** -np.asarray(SH, np.float64))[:, None]
    return d * sc * ACT_QMAX
