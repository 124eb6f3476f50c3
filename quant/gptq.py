"""Error-compensating weight quantization: GPTQ and learned clipping, for one linear layer.

Both work from the layer's input Hessian H = 2/n · Σ x xᵀ over calibration tokens (K × K), so the
objective is the layer *output* error ‖X (W − Ŵ)ᵀ‖².

* GPTQ (Frantar et al. 2022): columns are quantized left to right; the rounding error of each
  column is fed back into the not-yet-quantized columns through the Cholesky factor of H⁻¹
  (lazy batches of 128 columns). Group parameters are taken from the *updated* weights when a
  group starts. A pruning mask (True = kept) is respected: pruned weights are exactly 0, get
  code == zero point, and receive no error feedback.
* Learned clipping (the OmniQuant LWC objective): per group clip ratios (γ for the max, β for
  the min) that minimise the group's own output error Δ_g H_gg Δ_gᵀ; solved by a coarse-to-fine
  search per group rather than SGD (exact objective, no learning-rate tuning, deterministic).
* gptq+clip: the learned ratios then bound the group ranges GPTQ uses.
* act_order: columns are quantized in decreasing order of the Hessian diagonal (the inputs with the
  most energy first, so their error can still be fed back into the rest). The group parameters are
  then fixed from the weights before any update ("static groups"): groups stay contiguous runs of g
  input columns, the layout the accelerator streams.
"""
from __future__ import annotations

import functools

import torch

from .quantizers import check_group, group_params, quantize_codes


def single_thread(fn):
    """Run *fn* with one torch thread: the column loop is thousands of small ops, and on a shared
    2-core machine a second OpenMP thread makes each op wait for a descheduled peer (measured 15x
    slower under load); the work per op is too small to gain from two threads."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*a, **kw)
        finally:
            torch.set_num_threads(n)
    return wrapper


def _prep_hessian(H: torch.Tensor, W: torch.Tensor, percdamp: float):
    H = H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(H.shape[0], dtype=H.dtype)
    return H


@single_thread
def clip_search(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, mask: torch.Tensor | None = None,
                steps: int = 20, min_ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clip ratios (hi, lo) [N, K/g] minimising Δ_g H_gg Δ_gᵀ (see module doc)."""
    n, k = W.shape
    check_group(k, group)
    G = k // group
    Wm = (W * mask if mask is not None else W).float().reshape(n, G, group)
    mg = mask.reshape(n, G, group) if mask is not None else None
    Hb = torch.stack([H[i * group:(i + 1) * group, i * group:(i + 1) * group] for i in range(G)]).float()
    if min_ratio is None:
        min_ratio = 0.3 if bits <= 2 else (0.5 if bits == 3 else 0.7)
    grid = torch.linspace(1.0, min_ratio, steps)

    def err(hi, lo):
        s, z = group_params(Wm, bits, hi, lo)
        q = quantize_codes(Wm, s, z, bits)
        d = Wm - s[..., None] * (q - z[..., None])
        if mg is not None:
            d = d * mg
        return torch.einsum("ngi,gij,ngj->ng", d, Hb, d)

    best_hi = torch.ones(n, G)
    best_lo = torch.ones(n, G)
    best = err(best_hi, best_lo)
    # pass 1: one common ratio for max and min; pass 2: the max alone; pass 3: the min alone.
    for which in ("both", "hi", "lo"):
        base_hi, base_lo = best_hi.clone(), best_lo.clone()
        for r in grid:
            full = torch.full_like(base_hi, float(r))
            hi = full if which in ("both", "hi") else base_hi
            lo = full if which in ("both", "lo") else base_lo
            e = err(hi, lo)
            better = e < best
            best = torch.where(better, e, best)
            best_hi = torch.where(better, hi, best_hi)
            best_lo = torch.where(better, lo, best_lo)
    return best_hi, best_lo


@torch.no_grad()
@single_thread
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, mask: torch.Tensor | None = None,
                  clip_hi: torch.Tensor | None = None, clip_lo: torch.Tensor | None = None,
                  blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False):
    """GPTQ of W [N, K] with Hessian H [K, K]. Returns (codes uint8 [N,K], zeros uint8 [N,K/g],
    scales fp16 [N,K/g])."""
    n, k = W.shape
    check_group(k, group)
    qmax = (1 << bits) - 1
    W = W.clone().double()
    if mask is not None:
        W *= mask
    G = k // group
    if act_order:
        # static groups from the unquantized weights, then GPTQ over the permuted columns
        wg = W.float().reshape(n, G, group)
        s0, z0 = group_params(wg, bits, clip_hi if clip_hi is not None else 1.0, clip_lo)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        inv = torch.argsort(perm)
        codes_p, _, _ = _gptq_columns(W[:, perm], H[perm][:, perm], bits, group, None if mask is None else mask[:, perm],
                                      blocksize, percdamp, static=(s0, z0, perm))
        codes = codes_p[:, inv]
        return codes.to(torch.uint8), z0.to(torch.uint8), s0.to(torch.float16)
    codes, zeros, scales = _gptq_columns(W, H, bits, group, mask, blocksize, percdamp, clip_hi=clip_hi, clip_lo=clip_lo)
    return codes.to(torch.uint8), zeros.to(torch.uint8), scales.to(torch.float16)


def _gptq_columns(W, H, bits, group, mask, blocksize, percdamp, clip_hi=None, clip_lo=None, static=None):
    """The GPTQ column loop over W's columns in their given order. *static* = (scales [N,G], zeros
    [N,G], perm): fixed group parameters, column i belonging to group perm[i] // group."""
    n, k = W.shape
    qmax = (1 << bits) - 1
    H = _prep_hessian(H, W, percdamp)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    blocksize = max(blocksize // group, 1) * group
    G = k // group
    codes = torch.zeros(n, k)
    scales = torch.zeros(n, G)
    zeros = torch.zeros(n, G)
    if static is not None:
        s_all, z_all, perm = static
        col_group = perm // group
    maskd = mask.double() if mask is not None else None
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                gcol = int(col_group[col])
                scales[:, gcol], zeros[:, gcol] = s_all[:, gcol], z_all[:, gcol]
            elif col % group == 0:
                gi = col // group
                wg = W1[:, i:i + group].float()
                if mask is not None:
                    wg = wg * mask[:, col:col + group]
                hi = clip_hi[:, gi] if clip_hi is not None else 1.0
                lo = clip_lo[:, gi] if clip_lo is not None else None
                s, z = group_params(wg, bits, hi, lo)
                scales[:, gi], zeros[:, gi] = s, z
            gc = int(col_group[col]) if static is not None else col // group
            s, z = scales[:, gc], zeros[:, gc]
            w = W1[:, i]
            q = torch.clamp(torch.round(w.float() / s) + z, 0, qmax)
            if mask is not None:
                q = torch.where(mask[:, col], q, z)
            codes[:, col] = q
            deq = (s * (q - z)).double()
            d = Hinv1[i, i]
            err = (w - deq) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            if maskd is not None:
                W1[:, i:] *= maskd[:, col:i2]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if maskd is not None:
            W[:, i2:] *= maskd[:, i2:]
    return codes, zeros, scales


def brevitas_gptq_reference(W: torch.Tensor, X: torch.Tensor, bits: int, act_order: bool = False) -> torch.Tensor:
    """The same layer through brevitas' own GPTQ (``brevitas.graph.gptq.gptq_mode``), as an independent
    reference for :func:`gptq_quantize`: a ``QuantLinear`` with a per-output-channel asymmetric
    *bits*-bit weight quantizer whose scale and zero point are fixed from the float weights before
    GPTQ starts (brevitas' parameter-from-stats; with statistics recomputed from the updated weights
    GPTQ's error feedback would be measured against moving ranges), fed the calibration inputs *X*
    [n, K]. Returns brevitas' dequantized weights [N, K] (float32).

    Where ours differs (and why we keep ours for packages): groups of g input columns with fp16
    scales rounded up and integer zero points (the words the accelerator reads), a 2:4 mask whose
    pruned weights take no error feedback, static groups under act_order (contiguous runs the engine
    streams), learned clipping. At one group per row and no mask the two must agree
    (tests/test_quant.py)."""
    import brevitas.nn as qnn
    from brevitas.core.zero_point import ParameterFromStatsFromParameterZeroPoint
    from brevitas.graph.gptq import gptq_mode
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant import ShiftedUint8WeightPerChannelFloat

    class _Quant(ShiftedUint8WeightPerChannelFloat):
        bit_width = bits
        scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS
        zero_point_impl = ParameterFromStatsFromParameterZeroPoint

    n, k = W.shape
    lin = qnn.QuantLinear(k, n, bias=False, weight_quant=_Quant)
    with torch.no_grad():
        lin.weight.copy_(W.float())
        lin.quant_weight()                        # scale and zero point initialised from the float weights
        model = torch.nn.Sequential(lin).eval()
        with gptq_mode(model, use_quant_activations=False, act_order=act_order) as g:
            for _ in range(g.num_layers):
                model(X.float())
                g.update()
        return lin.quant_weight().value.detach().float()
