"""Integer quantizers of accllm: the one definition of every quantized number format in quant/.

Weights: group-wise asymmetric along K (input dim), b in {2,3,4,8} bits, group g | K::

    scale  = fp16_up((max - min) / (2^b - 1))       (range always includes 0, clipped by a ratio;
                                                     rounded up to the next fp16 value)
    zero   = clamp(round(-min / scale), 0, 2^b - 1)  (unsigned b-bit integer)
    code   = clamp(round(w / scale) + zero, 0, 2^b - 1)
    W_hat  = float(scale) * (code - zero)            (exactly what the package stores)

The scale is rounded to fp16 *before* the codes are computed, so the fake-quant torch weight and
the packed integer tensors agree bit for bit. The fake-quant weight is held as a brevitas
``GroupwiseIntQuantTensor`` (``.value`` the dequantized weight, ``.int()`` the codes).

Activations: per-token dynamic symmetric int8 (``scale = fp16_up(max|x| / 127)`` per row, codes in
[-127, 127]) or static per-tensor symmetric int8 with a calibrated fp16 scale.

KV cache (4-bit): keys per channel with static calibrated fp16 scale + integer zero, values per
token in groups of channels with dynamic fp16 scale + integer zero (asymmetric, unsigned codes).
"""
from __future__ import annotations

import torch

from algo.common import AccllmError

WEIGHT_BITS = (2, 3, 4, 8)
FP16_TINY = 2.0 ** -24   # smallest positive fp16 (subnormal); scales are clamped above it


def check_bits(bits: int) -> None:
    if bits not in WEIGHT_BITS:
        raise AccllmError(f"weight bits {bits!r} not supported; accepted: {', '.join(map(str, WEIGHT_BITS))}")


def check_group(k: int, group: int, name: str = "layer") -> None:
    if group <= 0 or k % group:
        raise AccllmError(f"group size {group} does not divide K={k} of {name}; choose a group size "
                          f"that divides every K (e.g. 32 or 64)")


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round a positive scale UP to the next fp16 value (kept as float32 values): the quantization
    range then always covers the requested range (no code is clipped by the fp16 rounding); no
    zeros, no infs."""
    s = scale.float().clamp(min=FP16_TINY, max=65504.0)
    h = s.to(torch.float16)
    up = h.float() < s
    if bool(up.any()):
        h = torch.where(up, (h.view(torch.int16) + 1).view(torch.float16), h)   # positive: next fp16
    return h.float()


def group_params(w: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0,
                 clip_lo: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-exact, float32) and zero point (float32 holding integers) of each row of *w*.

    *w* is [..., g] (one group per row); *clip* shrinks the max (and *clip_lo* the min, default the
    same ratio), broadcast over the leading dims."""
    qmax = (1 << bits) - 1
    w = w.float()
    hi = w.amax(dim=-1).clamp(min=0)
    lo = w.amin(dim=-1).clamp(max=0)
    if clip_lo is None:
        clip_lo = clip
    hi = hi * clip
    lo = lo * clip_lo
    scale = fp16_scale((hi - lo) / qmax)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (float32 integers in [0, 2^b-1]) of *w* [..., g] with per-row scale/zero [...]."""
    qmax = (1 << bits) - 1
    return torch.clamp(torch.round(w.float() / scale[..., None]) + zero[..., None], 0, qmax)


def dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale[..., None] * (codes - zero[..., None])


def fake_quant_groups(w: torch.Tensor, bits: int, clip=1.0) -> torch.Tensor:
    """Round-to-nearest fake quantization of *w* [..., g] (rows are groups)."""
    s, z = group_params(w, bits, clip)
    return dequant(quantize_codes(w, s, z, bits), s, z)


def quantize_weight_rtn(w: torch.Tensor, bits: int, group: int, clip=1.0, mask: torch.Tensor | None = None):
    """RTN group quantization of W [N, K]: returns (codes [N,K] uint8, zeros [N,K/g] uint8,
    scales [N,K/g] fp16). Pruned positions (mask False) get code == zero (exactly 0)."""
    n, k = w.shape
    check_group(k, group)
    wg = w.float().reshape(n, k // group, group)
    if mask is not None:
        wg = wg * mask.reshape(n, k // group, group)
    clip_t = clip if not torch.is_tensor(clip) else clip.reshape(n, k // group)
    s, z = group_params(wg, bits, clip_t)
    codes = quantize_codes(wg, s, z, bits)
    if mask is not None:
        codes = torch.where(mask.reshape(n, k // group, group), codes, z[..., None].expand_as(codes))
    return codes.reshape(n, k).to(torch.uint8), z.to(torch.uint8), s.to(torch.float16)


def weight_quant_tensor(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, group: int):
    """The brevitas ``GroupwiseIntQuantTensor`` of a quantized weight: ``.value`` is W_hat [N, K]
    (float32), ``.int()`` gives back the codes."""
    from brevitas.quant_tensor import GroupwiseIntQuantTensor
    n, k = codes.shape
    c = codes.float().reshape(n, k // group, group)
    s = scales.float().reshape(n, k // group, 1)
    z = zeros.float().reshape(n, k // group, 1)
    value = s * (c - z)
    return GroupwiseIntQuantTensor(value, s, z, group, 1, float(bits), False, False, dequant_shape=(n, k))


def dequant_weight(codes, zeros, scales, group: int) -> torch.Tensor:
    n, k = codes.shape
    s = scales.float().reshape(n, k // group, 1)
    z = zeros.float().reshape(n, k // group, 1)
    return (s * (codes.float().reshape(n, k // group, group) - z)).reshape(n, k)


# --- activations ------------------------------------------------------------------------------

def act_scale_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    qmax = (1 << (bits - 1)) - 1
    return fp16_scale(x.detach().abs().amax(dim=-1, keepdim=True).float() / qmax)


def act_fake_quant(x: torch.Tensor, bits: int = 8, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric int fake quantization of activations; *scale* None = per-token dynamic."""
    qmax = (1 << (bits - 1)) - 1
    s = act_scale_per_token(x, bits) if scale is None else scale
    q = torch.clamp(torch.round(x.float() / s), -qmax, qmax)
    return (q * s).to(x.dtype)


def act_int(x: torch.Tensor, bits: int = 8, scale: torch.Tensor | None = None):
    """Integer face of :func:`act_fake_quant`: (int8 codes, fp16 scale per token or per tensor)."""
    qmax = (1 << (bits - 1)) - 1
    s = act_scale_per_token(x, bits) if scale is None else scale
    q = torch.clamp(torch.round(x.float() / s), -qmax, qmax).to(torch.int8)
    return q, s.to(torch.float16)


# --- KV cache ---------------------------------------------------------------------------------

def asym_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = (1 << bits) - 1
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, qmax)
    return (scale * (q - zero)).to(x.dtype)


def asym_dynamic_fake_quant(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric fake quantization of the last dim of *x* in groups of *group* elements (dynamic
    fp16 scale and integer zero per group)."""
    shp = x.shape
    xg = x.float().reshape(*shp[:-1], shp[-1] // group, group)
    s, z = group_params(xg, bits)
    return dequant(quantize_codes(xg, s, z, bits), s, z).reshape(shp).to(x.dtype)
