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
    # np.minimum/np.maximum directly: np.clip's Python wrapper costs more than the work on small rows
    return np.minimum(np.maximum(np.asarray(x, dtype=np.int64), lo), hi)


def rshift_round(x, s) -> np.ndarray:
    """Round-half-up arithmetic shift right by *s* (array or scalar, s >= 0; s == 0 is identity)."""
    x = np.asarray(x, dtype=np.int64)
    if isinstance(s, (int, np.integer)):
        s = int(s)
        if s < 0:
            raise ValueError("rshift_round needs s >= 0")
        return x >> 0 if s == 0 else (x + (1 << (s - 1))) >> s
    s = np.asarray(s, dtype=np.int64)
    if np.any(s < 0):
        raise ValueError("rshift_round needs s >= 0")
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
    return np.right_shift(x + half, s)


def shift_sat32(y, r) -> np.ndarray:
    """y * 2**-r with round half up for r > 0, left shift for r <= 0; saturated to int32."""
    y = np.asarray(y, dtype=np.int64)
    r = np.broadcast_to(np.asarray(r, dtype=np.int64), y.shape)
    rs = np.minimum(np.maximum(r, 0), 62)
    right = np.right_shift(y + np.where(rs > 0, np.left_shift(np.int64(1), np.maximum(rs - 1, 0)), 0), rs)
    if not (r <= 0).any():
        return np.minimum(np.maximum(right, I32_MIN), I32_MAX)
    ls = np.minimum(np.maximum(-r, 0), 31)
    left = np.left_shift(np.minimum(np.maximum(y, I32_MIN), I32_MAX), ls)
    return sat(np.where(r > 0, right, left), 32)


def bitlen(x) -> np.ndarray:
    """Number of bits of non-negative integers (0 -> 0), exact for int64."""
    x = np.asarray(x, dtype=np.int64)
    if x.size and x.max() < (1 << 53):
        # exact through float64 below 2**53: frexp's exponent of v > 0 is its bit length
        return np.where(x > 0, np.frexp(x.astype(np.float64))[1], 0).astype(np.int64)
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


# --------------------------------------------------------------------------------------------------
# special-function unit
# --------------------------------------------------------------------------------------------------
def _lut(fn, n):
    i = np.arange(n, dtype=np.float64)
    return np.floor(fn(i) * 2.0 ** 30 + 0.5).astype(np.int64)


# exp2 ROM: EXP2_LUT[i] = round(2**(-i/256) * 2**30), i = 0..256 (257 x 31-bit entries)
EXP2_LUT = _lut(lambda i: 2.0 ** (-i / 256.0), 257)
# sigmoid ROM: SIGMOID_LUT[i] = round(sigmoid(-16 + i/32) * 2**30), i = 0..1024 (1025 x 31-bit entries)
SIGMOID_LUT = _lut(lambda i: 1.0 / (1.0 + np.exp(-(-16.0 + i / 32.0))), 1025)


def isqrt(v) -> np.ndarray:
    """Exact floor(sqrt(v)) of non-negative int64 (< 2**62)."""
    v = np.asarray(v, dtype=np.int64)
    s = np.floor(np.sqrt(v.astype(np.float64))).astype(np.int64)
    for _ in range(3):
        s = np.where(s * s > v, s - 1, s)
        s = np.where((s + 1) * (s + 1) <= v, s + 1, s)
    return s


def rmsnorm(x, gamma_q16, e40: int) -> np.ndarray:
    """RMSNorm of X32 rows [T, D] times gamma (int32 Q16.16 [D]) -> X32 [T, D].

    ns = max(0, bitlen(max|x|) - 20); xs = x >> ns (arithmetic); ss = sum xs**2 (< 2**54)
    w = (ss << 8) // D; eps_w = round_half_up(e40 * 2**-(2*ns))   (e40 = round(eps * 2**40))
    v = max(w + eps_w, 1)                       # mean square + eps, in units of 2**(2*ns - 40)
    h = (62 - bitlen(v)) // 2; vn = v << 2h     # vn in [2**60, 2**62)
    sq = isqrt(vn); rinv = 2**61 // sq          # the one reciprocal per token
    xh = sat32(round_half_up(x * rinv * 2**-(41 - h + ns)))      # normalized x, Q16.16
    y = sat32(round_half_up(xh * gamma * 2**-16))
    """
    x = np.asarray(x, np.int64)
    D = x.shape[-1]
    amax = np.abs(x).max(axis=-1)
    ns = np.maximum(bitlen(amax) - 20, 0)
    xs = x >> ns[..., None]
    ss = (xs * xs).sum(axis=-1)
    w = (ss << 8) // D
    eps_w = rshift_round(np.full(ns.shape, int(e40), np.int64), 2 * ns)
    v = np.maximum(w + eps_w, 1)
    h = (62 - bitlen(v)) // 2
    vn = v << (2 * h)
    rinv = (np.int64(1) << 61) // isqrt(vn)
    xh = shift_sat32(x * rinv[..., None], (41 - h + ns)[..., None])
    return sat(rshift_round(xh * np.asarray(gamma_q16, np.int64), 16), 32)


def sigmoid_q30(g) -> np.ndarray:
    """sigmoid of Q16.16 -> Q2.30 by the 1025-entry ROM with linear interpolation over [-16, 16)."""
    xc = np.clip(np.asarray(g, np.int64), -(16 << 16), (16 << 16) - 1) + (16 << 16)
    idx = xc >> 11
    rem = xc & 0x7FF
    lo = SIGMOID_LUT[idx]
    return lo + rshift_round((SIGMOID_LUT[idx + 1] - lo) * rem, 11)


def silu_mul(gate, up) -> np.ndarray:
    """SiLU(gate) * up of X32 -> X32: silu = round(g * sigmoid_q30(g) / 2**30); y = sat32(round(silu * up / 2**16))."""
    g = np.asarray(gate, np.int64)
    s = rshift_round(g * sigmoid_q30(g), 30)
    return sat(rshift_round(s * np.asarray(up, np.int64), 16), 32)


def add_sat(a, b) -> np.ndarray:
    return sat(np.asarray(a, np.int64) + np.asarray(b, np.int64), 32)


def argmax_first(logits) -> np.ndarray:
    return np.argmax(np.asarray(logits, np.int64), axis=-1)


# --------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------
# sine ROM: SIN_LUT[i] = round(sin(2*pi*i/4096) * 2**30), i = 0..4096 (4097 entries, Q2.30)
SIN_LUT = np.floor(np.sin(2 * np.pi * np.arange(4097) / 4096.0) * 2.0 ** 30 + 0.5).astype(np.int64)


def rope_inv_freq(rope: dict, head_dim: int) -> np.ndarray:
    """Compiler side (float64): the inverse frequency of each rotary pair i = 0..head_dim/2-1 for a RoPE
    of :func:`algo.models.rope_parameters`: default theta**(-2i/hd); ``linear`` that / factor; ``llama3``
    (Llama 3.1/3.2) the wavelength-dependent rescaling of transformers' ``_compute_llama3_parameters``:
    wavelengths below original_max_position_embeddings / high_freq_factor unchanged, above
    original_max_position_embeddings / low_freq_factor divided by factor, in between interpolated with
    s = (orig / wavelength - low) / (high - low): (1 - s) * f / factor + s * f. The scaling changes only
    this table (the attention unit reads the words of :func:`rope_freq_words`), not the datapath."""
    hd = int(head_dim)
    f = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return f
    if kind == "linear":
        return f / float(rope["factor"])
    if kind != "llama3":
        raise AccllmError(f"RoPE type {kind!r} has no frequency table; accepted: default, linear, llama3")
    factor, lo, hi = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    orig = float(rope["original_max_position_embeddings"])
    wavelen = 2 * np.pi / f
    out = np.where(wavelen > orig / lo, f / factor, f)
    s = (orig / wavelen - lo) / (hi - lo)
    mid = ~(wavelen < orig / hi) & ~(wavelen > orig / lo)
    return np.where(mid, (1 - s) * out / factor + s * out, out)


def rope_freq_words(inv_freq) -> np.ndarray:
    """Compiler side (float64): phase increment per position of each rotary pair, in turns * 2**32:
    F[i] = round(inv_freq[i] * 2**32 / (2*pi)) (uint32). Positions are not bounded by a table: the
    phase of position p is (p * F) mod 2**32, like a DDS."""
    f = np.floor(np.asarray(inv_freq, np.float64) * 2.0 ** 32 / (2 * np.pi) + 0.5)
    if np.any(f >= 2.0 ** 32) or np.any(f < 0):
        raise AccllmError("RoPE frequency out of range")
    return f.astype(np.int64)


def _sin_phase(ph) -> np.ndarray:
    ph = np.asarray(ph, np.int64)
    idx = ph >> 20
    rem = ph & 0xFFFFF
    lo = SIN_LUT[idx]
    return lo + rshift_round((SIN_LUT[idx + 1] - lo) * rem, 20)


def rope_cos_sin(pos, F) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (Q2.30) of positions pos [...] for frequency words F [hd/2] -> [..., hd/2].
    phase = (pos * F) mod 2**32; sin by SIN_LUT[phase >> 20] + linear interpolation over the 20 low
    bits (round half up); cos(phase) = sin(phase + 2**30)."""
    p = np.asarray(pos, np.uint64)[..., None]
    ph = ((p * np.asarray(F, np.uint64)) & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return _sin_phase((ph + (1 << 30)) & 0xFFFFFFFF), _sin_phase(ph)


def rope(x, C, S) -> np.ndarray:
    """Rotate X32 [..., hd] (HF rotate_half pairs i, i + hd/2) by C, S [..., hd/2] (Q2.30):
    y1 = round((x1*C - x2*S) / 2**30), y2 = round((x2*C + x1*S) / 2**30), saturated to int32."""
    x = np.asarray(x, np.int64)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    y1 = sat(rshift_round(x1 * C - x2 * S, 30), 32)
    y2 = sat(rshift_round(x2 * C + x1 * S, 30), 32)
    return np.concatenate([y1, y2], axis=-1)


# --------------------------------------------------------------------------------------------------
# KV-cache unit (4-bit)
# --------------------------------------------------------------------------------------------------
KV_QMAX = 15
LOG2E = 1.4426950408889634


def key_consts(k_scale_fp16, k_zero, head_dim: int) -> dict:
    """Compiler side: hardware constants of the static per-channel key quantizer [Hkv, hd].

    Append: q = clamp(round_half_up(k * RK * 2**-KS) + KZ, 0, 15) with sk = m' * 2**e' (m' in [1024, 2047]),
    RK = round_half_up(2**32 / m') (< 2**22 + 1), KS = 48 + e'.
    Scores: kappa = sk * log2(e) / sqrt(hd) = KM * 2**-KSH (KM < 2**16, KSH per kv head).
    """
    s = np.asarray(k_scale_fp16, np.float16)
    m, e = fp16_parts(s)
    if np.any(m <= 0):
        raise AccllmError("key scales must be positive")
    n = 11 - bitlen(m)
    m2, e2 = m << n, e - n
    RK = ((np.int64(1) << 33) + m2) // (2 * m2)
    KS = 48 + e2
    kz = np.asarray(k_zero, np.float64)
    if np.any(kz < 0) or np.any(kz > KV_QMAX) or np.any(kz != np.round(kz)):
        raise AccllmError("key zero points must be integers in [0, 15]")
    kappa = s.astype(np.float64) * LOG2E / np.sqrt(head_dim)
    kmax = kappa.max(axis=-1)
    KSH = np.floor(np.log2((2 ** 16 - 1) / kmax)).astype(np.int64)
    KM = np.floor(kappa * 2.0 ** KSH[:, None] + 0.5).astype(np.int64)
    KSH = np.where(KM.max(axis=-1) > 0xFFFF, KSH - 1, KSH)
    KM = np.floor(kappa * 2.0 ** KSH[:, None] + 0.5).astype(np.int64)
    if np.any(KSH < -128) or np.any(KSH > 127):
        raise AccllmError("key scales out of the hardware range")
    return dict(RK=RK.astype(np.int64), KS=KS.astype(np.int64), KZ=kz.astype(np.int64), KM=KM, KSH=KSH)


def key_quant(k, RK, KS, KZ) -> np.ndarray:
    """X32 keys [..., hd] -> 4-bit codes with the static per-channel constants."""
    q = rshift_round(np.asarray(k, np.int64) * RK, KS) + KZ
    return np.clip(q, 0, KV_QMAX)


def value_quant(v, group: int) -> tuple[np.ndarray, np.ndarray]:
    """X32 values [..., hd] -> (4-bit codes [..., hd], group words [..., hd/group]).

    Per group: hi = max(max v, 0), lo = min(min v, 0), r = max(hi - lo, 1); Rv = (15 << 32) // r
    (one reciprocal per group); z = clamp(round_half_up(-lo * Rv / 2**32), 0, 15);
    q = clamp(round_half_up(v * Rv / 2**32) + z, 0, 15). Dequantization scale r / 15 = vm * 2**-vsh,
    vsh = 19 - bitlen(r), vm = round_half_up(r * 2**vsh / 15) < 2**16.
    Word = vm | (vsh & 0xFF) << 16 | z << 24.
    """
    v = np.asarray(v, np.int64)
    sh = v.shape
    vg = v.reshape(sh[:-1] + (sh[-1] // group, group))
    hi = np.maximum(vg.max(-1), 0)
    lo = np.minimum(vg.min(-1), 0)
    r = np.maximum(hi - lo, 1)
    Rv = (np.int64(KV_QMAX) << 32) // r
    z = np.clip(rshift_round(-lo * Rv, 32), 0, KV_QMAX)
    q = np.clip(rshift_round(vg * Rv[..., None], 32) + z[..., None], 0, KV_QMAX)
    vsh = 19 - bitlen(r)
    pos = ((r << np.maximum(vsh, 0)) * 2 + 15) // 30
    nsh = np.maximum(-vsh, 0)
    neg = (2 * r + (np.int64(15) << nsh)) // (np.int64(30) << nsh)
    vm = np.where(vsh >= 0, pos, neg)
    words = vm | ((vsh & 0xFF) << 16) | (z << 24)
    return q.reshape(sh), words


def value_dequant(codes, words, group: int) -> np.ndarray:
    """4-bit value codes + group words -> X32: v = sat32(round_half_up((q - z) * vm * 2**-vsh))."""
    w = np.asarray(words, np.int64)
    vm = w & 0xFFFF
    vsh = ((w >> 16) & 0xFF).astype(np.int8).astype(np.int64)
    z = (w >> 24) & 0xF
    c = np.asarray(codes, np.int64)
    sh = c.shape
    cg = c.reshape(sh[:-1] + (sh[-1] // group, group))
    return shift_sat32((cg - z[..., None]) * vm[..., None], vsh[..., None]).reshape(sh)


def attn_scores(q, kcodes, KZ, KM, ksh: int) -> np.ndarray:
    """Scores in log2 units, Q16.16: qf = round_half_up(q * KM / 2**16) (|qf| < 2**31);
    s_j = sat32(round_half_up(sum_c qf_c * (k_jc - KZ_c) * 2**-(KSH - 16))).
    q [hd] (X32 after RoPE), kcodes [n, hd], KZ/KM [hd]."""
    qf = rshift_round(np.asarray(q, np.int64) * KM, 16)
    d = np.asarray(kcodes, np.int64) - KZ
    return shift_sat32(d @ qf, ksh - 16)


def softmax_q24(s, valid=None) -> np.ndarray:
    """Softmax of log2-domain scores (Q16.16) -> probabilities Q8.24 (int).

    m = max s; u = m - s; e = ROM-exp2(-(u mod 2**16)) >> (u >> 16) in Q2.30 with
    ROM-exp2(f) = E[f >> 8] - round_half_up((E[f >> 8] - E[(f >> 8) + 1]) * (f & 255) / 2**8);
    sum = sum e (>= 2**30); RS = 2**62 // sum (the one reciprocal); p = round_half_up(e * RS / 2**38)."""
    s = np.asarray(s, np.int64)
    if valid is None:
        valid = np.ones(s.shape, bool)
    m = np.where(valid, s, np.iinfo(np.int64).min).max(axis=-1, keepdims=True)
    u = np.where(valid, m - s, 0)
    ip = u >> 16
    f = u & 0xFFFF
    idx = f >> 8
    rem = f & 0xFF
    val = EXP2_LUT[idx] - rshift_round((EXP2_LUT[idx] - EXP2_LUT[idx + 1]) * rem, 8)
    e = np.where(valid & (ip < 62), rshift_round(val, np.minimum(ip, 62)), 0)
    total = e.sum(axis=-1, keepdims=True)
    RS = (np.int64(1) << 62) // total
    return rshift_round(e * RS, 38)


def attn_out(p, vhat) -> np.ndarray:
    """o_c = sat32(round_half_up(sum_j p_j * v_jc / 2**24)); p [n] Q8.24, vhat [n, hd] X32."""
    return sat(rshift_round(np.asarray(p, np.int64) @ np.asarray(vhat, np.int64), 24), 32)


# --------------------------------------------------------------------------------------------------
# SpAtten importance and keep counts (the top-k engine, TOPK; algo/spatten.py uses the same rules)
# --------------------------------------------------------------------------------------------------
from algo.topk import KEEP_FRAC, keep_count, keep_q16  # noqa: E402,F401  (one rule for algo and hw)

IMP_MAX = (1 << 63) - 1        # importance accumulators saturate here (unsigned 63-bit)


def imp_add(acc, inc) -> np.ndarray:
    """Saturating importance accumulation: min(acc + inc, IMP_MAX) for acc, inc in [0, IMP_MAX]."""
    s = np.asarray(acc, np.int64).astype(np.uint64) + np.asarray(inc, np.int64).astype(np.uint64)
    return np.minimum(s, np.uint64(IMP_MAX)).astype(np.int64)


def head_norm(o) -> np.ndarray:
    """Head importance of one query row: floor(sqrt(sum_c round_half_up(o_c / 2**8)**2)) of a head's output
    o [..., hd] (X32, Q16.16): each term < 2**46, the sum < 2**54 for hd <= 256; the result is Q16.8."""
    r = rshift_round(np.asarray(o, np.int64), 8)
    return isqrt((r * r).sum(axis=-1))
