"""Outlier smoothing of linear-layer inputs (SmoothQuant-style), before pruning and quantization.

For a linear input x with per-channel calibration maximum a_j and weight column maxima w_j, the factor
s_j = a_j**alpha / w_j**(1 - alpha) moves range from the activation into the weights: x_j / s_j enters
the layer, its weight columns are multiplied by s_j, so the float function is unchanged. The division
is folded into whatever produces x, so the accelerator runs exactly the same program:

  q/k/v input      <- input_layernorm weight / s          (s shared by q_proj, k_proj, v_proj)
  gate/up input    <- post_attention_layernorm weight / s (s shared by gate_proj, up_proj)
  o_proj input     <- v_proj rows / s   (attention output is linear in v; with GQA one factor per
                      v channel, the largest over the query heads that share it)
  down_proj input  <- up_proj rows / s  (silu(gate) * up is linear in up)

Factors are clamped to [1e-2, 1e2] so RMSNorm weights stay representable in the accelerator's
Q16.16 norm format (hw/numerics.fp16_to_q16). Calibration: WikiText-2 valid windows (never test).
"""
from __future__ import annotations

import torch

from algo.common import AccllmError

S_MIN, S_MAX = 1e-2, 1e2


def _factors(a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    a = a.float().clamp(min=1e-5)
    w = w.float().clamp(min=1e-5)
    return (a ** alpha / w ** (1.0 - alpha)).clamp(S_MIN, S_MAX)


@torch.no_grad()
def smooth_model(model, recipe, calib: torch.Tensor, progress: bool = True) -> dict:
    """Apply smoothing with strength recipe.smooth_alpha in place; returns a report (factor ranges)."""
    from tqdm.auto import tqdm
    alpha = float(recipe.smooth_alpha)
    if not 0.0 < alpha < 1.0:
        raise AccllmError(f"smooth_alpha must be in (0, 1) to smooth, got {alpha}")
    if calib is None:
        raise AccllmError("outlier smoothing needs calibration windows (WikiText-2 valid)")
    cfg = model.config
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
    layers = model.model.layers
    stats: dict = {}
    hooks = []
    for i, L in enumerate(layers):
        for key, mod in (("qkv", L.self_attn.q_proj), ("gu", L.mlp.gate_proj), ("o", L.self_attn.o_proj),
                         ("down", L.mlp.down_proj)):
            def hook(mod_, inp, out, k=(i, key)):
                x = inp[0].detach()
                a = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
                stats[k] = torch.maximum(stats[k], a) if k in stats else a
            hooks.append(mod.register_forward_hook(hook))
    try:
        bar = tqdm(total=len(calib), desc="smooth: calibrate", disable=not progress, leave=False)
        for b in calib:
            model(b[None])
            bar.update(1)
        bar.close()
    finally:
        for h in hooks:
            h.remove()
    report = {"alpha": alpha, "layers": {}}
    for i, L in enumerate(layers):
        rep = {}
        for key, norm, lins in (("qkv", L.input_layernorm, (L.self_attn.q_proj, L.self_attn.k_proj, L.self_attn.v_proj)),
                                ("gu", L.post_attention_layernorm, (L.mlp.gate_proj, L.mlp.up_proj))):
            s = _factors(stats[(i, key)], torch.stack([lin.weight.abs().amax(0) for lin in lins]).amax(0), alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            for lin in lins:
                lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
            rep[key] = (round(float(s.min()), 4), round(float(s.max()), 4))
        s = _factors(stats[(i, "o")], L.self_attn.o_proj.weight.abs().amax(0), alpha)
        s = s.reshape(Hkv, Hq // Hkv, hd).amax(1)                      # one factor per v channel
        L.self_attn.o_proj.weight.mul_(s[:, None, :].expand(Hkv, Hq // Hkv, hd).reshape(1, -1).to(L.self_attn.o_proj.weight.dtype))
        L.self_attn.v_proj.weight.div_(s.reshape(-1, 1).to(L.self_attn.v_proj.weight.dtype))
        if L.self_attn.v_proj.bias is not None:
            L.self_attn.v_proj.bias.div_(s.reshape(-1).to(L.self_attn.v_proj.bias.dtype))
        rep["o"] = (round(float(s.min()), 4), round(float(s.max()), 4))
        s = _factors(stats[(i, "down")], L.mlp.down_proj.weight.abs().amax(0), alpha)
        L.mlp.down_proj.weight.mul_(s.to(L.mlp.down_proj.weight.dtype)[None, :])
        L.mlp.up_proj.weight.div_(s.to(L.mlp.up_proj.weight.dtype)[:, None])
        if L.mlp.up_proj.bias is not None:
            L.mlp.up_proj.bias.div_(s.to(L.mlp.up_proj.bias.dtype))
        rep["down"] = (round(float(s.min()), 4), round(float(s.max()), 4))
        report["layers"][i] = rep
    return report
