"""Block-wise reconstruction after PTQ (recipe key ``block_tune_steps`` > 0).

A CPU-affordable middle ground between post-training quantization and end-to-end distillation
(quant/qat.py), in the spirit of OmniQuant / EfficientQAT's block-wise training: right after the
PTQ (GPTQ / clipping) of decoder block i inside the sequential calibration of quant/quantize.py,

* the block's quantized linear layers get two learnable tensors each:
  ``u`` — the integer code minus the zero point, as a real number in units of quantization steps,
  initialised to the PTQ codes (so training starts exactly at the PTQ result, GPTQ's error feedback
  included), and ``t`` — the log of the group scale relative to its PTQ value (initialised to 0);
* forward: ``code = clamp(round_ste(u) + z, 0, 2^b − 1)``, ``Ŵ = s0·e^t·(code − z)`` (straight-
  through round; pruned positions stay exactly 0); the zero points stay the PTQ integers;
* loss: mean squared error between the block's output on the *quantized* model's input stream
  and the float block's output on the *float* model's input stream (so a block also corrects
  what earlier blocks lost); one step = one random calibration window (WikiText-2 valid) — or only
  its first ``block_tune_tokens`` tokens (exact under causal attention, cheaper steps), Adam with
  a cosine learning rate; both ``u`` (steps) and ``t`` (log scale) use ``block_tune_lr`` — the same
  learning rate means "up to about lr of a quantization step / lr relative scale per step",
  independent of the weights' magnitude;
* at the end the scales are rounded up to fp16, the codes fixed (``round(u) + z``), and the
  layer's buffers replaced — the package format and the accelerator stream are unchanged.

Activation fake-quant is off during the tuning (as during the rest of the sequential calibration);
layers kept in float or at 8 bits are not tuned.

N:M pruning without weight quantization (algo/prune.py) uses the same loop on the kept float
weights: each moves by ``d`` times its row's standard deviation (``block_tune_lr`` per step is then a
fraction of that deviation), the pruned positions stay 0.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .qat import _round_ste
from .qlinear import QLinear
from .quantizers import fp16_scale


class _CodeTimesScale(torch.autograd.Function):
    """``clamp(round(u), lo, hi) · scale`` (masked) with the straight-through gradient: d/du = scale
    where the rounded code lies inside [lo, hi] (and the position is kept), d/dscale = the code.
    One fused function instead of a chain of autograd ops: the weight reconstruction is a fixed
    cost of every tuning step, as large as the block's matrix products on a few hundred tokens."""

    @staticmethod
    def forward(ctx, u, scale, lo, hi, keep):
        r = torch.round(u)
        q = torch.minimum(torch.maximum(r, lo), hi)
        inside = (r >= lo) & (r <= hi)
        if keep is not None:
            q = q * keep
            inside &= keep
        ctx.save_for_backward(q, scale, inside)
        return q * scale

    @staticmethod
    def backward(ctx, g):
        q, scale, inside = ctx.saved_tensors
        return g * scale * inside, (g * q).sum(-1, keepdim=True), None, None, None


class _StepCodes(torch.nn.Module):
    def __init__(self, q: QLinear):
        super().__init__()
        n, k, g = q.out_features, q.in_features, q.group
        G = k // g
        z = q.zeros.float().reshape(n, G, 1)
        c = q.codes.float().reshape(n, G, g)
        self.u = torch.nn.Parameter(c - z)
        self.t = torch.nn.Parameter(torch.zeros(n, G, 1))
        self.register_buffer("s0", q.scales.float().reshape(n, G, 1))
        self.register_buffer("z", z)
        self.qmax = (1 << q.bits) - 1
        self.shape = (n, k)
        self.mask = q.mask
        self.register_buffer("lo", -z)                   # code - zero lies in [-z, qmax - z]
        self.register_buffer("hi", self.qmax - z)
        self.keep = None if q.mask is None else q.mask.reshape(n, G, g).bool()

    def tensors(self):
        return [self.u, self.t]

    @staticmethod
    def save(q):
        return q.codes.clone(), q.scales.clone()

    @staticmethod
    def restore(q, saved) -> None:
        q.codes, q.scales = saved
        q.refresh()

    def weight(self) -> torch.Tensor:
        scale = self.s0 * torch.exp(self.t)
        return _CodeTimesScale.apply(self.u, scale, self.lo, self.hi, self.keep).reshape(self.shape)

    def weight_reference(self) -> torch.Tensor:
        """The same weight from plain autograd ops (tests check the fused function against it)."""
        c = torch.clamp(_round_ste(self.u) + self.z, 0, self.qmax)
        w = (self.s0 * torch.exp(self.t) * (c - self.z)).reshape(self.shape)
        return w * self.mask if self.mask is not None else w

    @torch.no_grad()
    def freeze_into(self, q: QLinear) -> int:
        """Write codes and fp16 scales into *q*; returns how many codes changed."""
        n, k = self.shape
        codes = torch.clamp(torch.round(self.u) + self.z, 0, self.qmax)
        if self.mask is not None:
            codes = torch.where(self.mask.reshape(codes.shape), codes, self.z.expand_as(codes))
        codes = codes.reshape(n, k).to(torch.uint8)
        changed = int((codes != q.codes).sum())
        q.codes = codes
        q.scales = fp16_scale((self.s0 * torch.exp(self.t)).reshape(n, -1)).to(torch.float16)
        q.refresh()
        return changed


class _MaskedFloat(torch.nn.Module):
    """A pruned float layer (``accllm_mask``, no quantization): the kept weights move by ``d`` in
    units of their row's standard deviation; pruned positions stay exactly 0."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        w0 = lin.weight.detach().float()
        mask = lin.accllm_mask.to(w0.device).bool()
        self.register_buffer("w0", w0 * mask)
        self.register_buffer("mask", mask)
        kept = mask.float().sum(1, keepdim=True).clamp(min=1)
        mean = self.w0.sum(1, keepdim=True) / kept
        var = (((self.w0 - mean) * mask) ** 2).sum(1, keepdim=True) / kept
        self.register_buffer("sigma", var.sqrt().clamp(min=1e-8))
        self.d = torch.nn.Parameter(torch.zeros_like(w0))

    def tensors(self):
        return [self.d]

    def weight(self) -> torch.Tensor:
        return (self.w0 + self.d * self.sigma) * self.mask

    @torch.no_grad()
    def freeze_into(self, lin) -> int:
        w = self.weight()
        changed = int(((w - self.w0).abs() > 0).sum())
        lin.weight.data.copy_(w.to(lin.weight.dtype))
        return changed

    @staticmethod
    def save(lin):
        return lin.weight.detach().clone()

    @staticmethod
    def restore(lin, saved) -> None:
        lin.weight.data.copy_(saved)


CHECK_WINDOWS = 8      # windows on which the error before / after is measured (and a worse block reverted)


def _tunable(block) -> dict[str, torch.nn.Module]:
    """The block's low-bit QLinear layers; or, in a block not quantized yet, its pruned nn.Linear
    layers (``accllm_mask``, N:M pruning alone)."""
    q = {n: m for n, m in block.named_modules() if isinstance(m, QLinear) and m.bits and m.bits < 8}
    if q:
        return q
    return {n: m for n, m in block.named_modules()
            if isinstance(m, torch.nn.Linear) and getattr(m, "accllm_mask", None) is not None}


def _prefix_kwargs(kw: dict, t: int, length: int) -> dict:
    """The decoder-layer keyword arguments for the first *t* of *length* tokens: every tensor with a
    sequence axis (position ids, RoPE cos/sin, an explicit attention mask) cut to its first t positions.
    Under causal attention the block's outputs at those positions are exactly those of the full window."""
    def cut(v):
        if isinstance(v, torch.Tensor):
            if v.dim() == 4 and v.shape[-1] == length and v.shape[-2] == length:     # [b, 1, L, L] mask
                return v[..., :t, :t]
            if v.dim() >= 2 and v.shape[1] == length:                                # [b, L, ...]
                return v[:, :t]
            if v.dim() == 1 and v.shape[0] == length:                                # cache_position
                return v[:t]
            return v
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v
    return {k: cut(v) for k, v in kw.items()}


def _window_kwargs(kw: dict, j: int, batch: int) -> dict:
    """The decoder-layer keyword arguments for window *j* of a batch of *batch* windows: a tensor with a
    batch axis of that size (an explicit attention mask, e.g. Mistral's sliding-window mask) cut to
    window j; everything else (RoPE cos/sin, position ids: batch 1) broadcasts as it is."""
    if batch == 1:
        return kw

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] == batch:
            return v[j:j + 1]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v
    return {k: cut(v) for k, v in kw.items()}


def tune_block(block, inputs: list[torch.Tensor], kwargs: list[dict], targets: list[torch.Tensor],
               steps: int, lr: float, seed: int = 0, tokens: int = 0) -> dict:
    """Train the quantized linear layers of *block* (in place) so that ``block(inputs[b], **kwargs[b])``
    approaches ``targets[b]``; returns the MSE before and after (on the first CHECK_WINDOWS windows;
    the block goes back to its PTQ codes and scales if tuning did not lower it), and counts.
    *tokens* > 0 trains each step on the first *tokens* positions of its window only (cheaper steps;
    the before/after check always uses whole windows)."""
    qmods = _tunable(block)
    if not qmods or steps <= 0:
        return {"steps": 0}
    states = {n: (_StepCodes(m) if isinstance(m, QLinear) else _MaskedFloat(m)) for n, m in qmods.items()}

    def fwd_for(st, bias):
        return lambda x: F.linear(x, st.weight(), bias)

    windows = [(b, j) for b, x in enumerate(inputs) for j in range(x.shape[0])]
    check = windows[:CHECK_WINDOWS]
    length = inputs[0].shape[1]
    t = tokens if 0 < tokens < length else length
    step_kwargs = [_prefix_kwargs(kw, t, length) if t < length else kw for kw in kwargs]

    @torch.no_grad()
    def mse() -> float:
        tot, cnt = 0.0, 0
        for b, j in check:
            y = targets[b][j:j + 1]
            tot += float(F.mse_loss(block(inputs[b][j:j + 1], **_window_kwargs(kwargs[b], j, inputs[b].shape[0])), y,
                                    reduction="sum"))
            cnt += y.numel()
        return tot / max(cnt, 1)

    t0 = time.time()
    before = mse()
    frozen = {}
    for p in block.parameters():
        frozen[p] = p.requires_grad
        p.requires_grad_(False)
    saved = {n: states[n].save(m) for n, m in qmods.items()}
    for n, m in qmods.items():
        m.forward = fwd_for(states[n], m.bias)
    params = [p for st in states.values() for p in st.tensors()]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                # one calibration window per step (the keyword arguments broadcast over the batch)
                b, j = windows[int(torch.randint(0, len(windows), (1,), generator=g))]
                loss = F.mse_loss(block(inputs[b][j:j + 1, :t], **_window_kwargs(step_kwargs[b], j, inputs[b].shape[0])),
                                  targets[b][j:j + 1, :t])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        changed = 0
        for n, m in qmods.items():
            del m.forward                        # back to the class's forward on the frozen weights
            changed += states[n].freeze_into(m)
        for p, r in frozen.items():
            p.requires_grad_(r)
    after = mse()
    reverted = not after < before
    if reverted:                                 # never leave a block worse than its PTQ result
        for n, m in qmods.items():
            states[n].restore(m, saved[n])
        changed = 0
    total = sum(int(m.weight.numel()) for m in qmods.values())
    return {"steps": steps, "tokens": t, "mse_before": before, "mse_after": min(before, after), "mse_tuned": after,
            "reverted": reverted, "codes_changed": changed, "weights": total, "seconds": round(time.time() - t0, 2)}
