"""Quantization-aware distillation after PTQ (recipe key ``qat_steps`` > 0).

End-to-end knowledge distillation from the float model (teacher) into the quantized one (student)
on WikiText-2 *valid* windows (the calibration batches, never test):

* every quantized linear layer with bits < 8 gets a learnable latent weight (initialised to the float
  weight; ``init="ptq"`` starts from Ŵ instead) and a learnable per-group scale initialised to the
  PTQ scale (so learned clipping carries over); the zero points stay the PTQ integers. Forward: ``code = clamp(round_ste(W/s) + z, 0, 2^b-1)``, ``Ŵ = s·(code − z)`` with
  a straight-through estimator for round (LSQ-style: gradients reach both W and s); pruned weights
  stay exactly 0 (mask);
* int8 activations stay on (per-token fake quant with STE);
* loss = KL(teacher ‖ student) of the next-token distributions (temperature 1), AdamW, cosine LR;
* at the end scales are rounded to fp16, codes recomputed, and the layers frozen back into the
  exact integer format of the package.

Runs on CUDA when available (``device="auto"``), else CPU. The teacher is a copy of the float
model taken before quantization (``quantize_model`` keeps it when ``qat_steps`` > 0).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .qlinear import QLinear
from .quantizers import fp16_scale


def _round_ste(x):
    return x + (torch.round(x) - x).detach()


def _act_ste(x, bits):
    qmax = (1 << (bits - 1)) - 1
    s = (x.detach().abs().amax(-1, keepdim=True) / qmax).clamp(min=2.0 ** -24)
    q = torch.clamp(_round_ste(x / s), -qmax, qmax)
    return q * s


class _QATState(torch.nn.Module):
    def __init__(self, q: QLinear, init_weight: torch.Tensor | None = None):
        super().__init__()
        n, k, g = q.out_features, q.in_features, q.group
        w0 = q.weight if init_weight is None else init_weight.float() * (q.mask if q.mask is not None else 1)
        self.w = torch.nn.Parameter(w0.detach().clone())
        self.s = torch.nn.Parameter(q.scales.detach().float().clone().reshape(n, k // g, 1))
        self.register_buffer("z", q.zeros.detach().float().reshape(n, k // g, 1))
        self.bits, self.g = q.bits, g
        self.mask = q.mask

    def weight(self):
        n, k = self.w.shape
        qmax = (1 << self.bits) - 1
        s = self.s.abs().clamp(min=2.0 ** -24)
        wg = self.w.reshape(n, k // self.g, self.g)
        c = torch.clamp(_round_ste(wg / s) + self.z, 0, qmax)
        w = (s * (c - self.z)).reshape(n, k)
        return w * self.mask if self.mask is not None else w


def _qat_forward(q: QLinear, st: _QATState):
    def fwd(x):
        if q.act_bits and q.act_enabled:
            x = _act_ste(x, q.act_bits) if q.act_scheme == "per_token" else x + (q.quant_input(x) - x).detach()
        return F.linear(x, st.weight(), q.bias)
    return fwd


@torch.no_grad()
def _freeze(q: QLinear, st: _QATState) -> None:
    n, k = st.w.shape
    qmax = (1 << st.bits) - 1
    s = fp16_scale(st.s.detach().abs().reshape(n, k // st.g))
    z = st.z.reshape(n, k // st.g)
    wg = st.w.detach().float().reshape(n, k // st.g, st.g)
    c = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, qmax)
    if st.mask is not None:
        c = torch.where(st.mask.reshape(n, k // st.g, st.g), c, z[..., None].expand_as(c))
    q.codes = c.reshape(n, k).to(torch.uint8).to(q.codes.device)
    q.scales = s.to(torch.float16).to(q.scales.device)
    q.refresh()


def distill(model, recipe, calib: torch.Tensor, teacher=None, progress: bool = True, device: str = "auto",
            lr: float = 2e-5, scale_lr: float = 1e-4, batch: int = 4, seqlen: int | None = None,
            init: str = "fp") -> dict:
    """Distil *teacher* (float) into the quantized *model* in place for ``recipe.qat_steps`` steps."""
    from tqdm.auto import tqdm
    if teacher is None:
        teacher = getattr(model, "accllm_teacher", None)
    if teacher is None:
        raise RuntimeError("QAT needs the float teacher model (quantize_model keeps one when qat_steps > 0)")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    steps = recipe.qat_steps
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QLinear) and m.bits and m.bits < 8}
    # latent weights start from the float weights (init="fp": a latent at the centre of its PTQ bin
    # would need half a quantization step of updates before any code can change) or from Ŵ ("ptq")
    states = {n: _QATState(m, teacher.get_submodule(n).weight if init == "fp" else None) for n, m in qmods.items()}
    model.to(dev)
    teacher.to(dev).eval()
    for st in states.values():
        st.to(dev)
        if st.mask is not None:
            st.mask = st.mask.to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in qmods.items():
        m.forward = _qat_forward(m, states[n])
    params_w = [st.w for st in states.values()]
    params_s = [st.s for st in states.values()]
    opt = torch.optim.AdamW([{"params": params_w, "lr": lr, "weight_decay": 0.0},
                             {"params": params_s, "lr": scale_lr, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    g = torch.Generator().manual_seed(recipe.seed + 1)
    data = calib if seqlen is None else calib[:, :seqlen]
    losses = []
    t0 = time.time()
    bar = tqdm(total=steps, desc=f"qat ({dev.type})", disable=not progress, leave=False)
    try:
        for step in range(steps):
            idx = torch.randint(0, data.shape[0], (min(batch, data.shape[0]),), generator=g)
            ids = data[idx].to(dev)
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
            with torch.enable_grad():
                s_logits = model(input_ids=ids, use_cache=False).logits.float()
                loss = F.kl_div(F.log_softmax(s_logits, -1), t_logp, log_target=True, reduction="batchmean") / ids.shape[1]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        for n, m in qmods.items():
            del m.forward                       # back to QLinear.forward
            _freeze(m, states[n])
        model.to("cpu")
        teacher.to("cpu")
    return {"steps": steps, "device": dev.type, "seconds": round(time.time() - t0, 2),
            "kl_first": losses[0] if losses else None, "kl_last_10": sum(losses[-10:]) / max(len(losses[-10:]), 1),
            "kl_curve": losses[:: max(1, len(losses) // 50)]}
