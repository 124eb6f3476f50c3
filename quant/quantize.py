"""Weight + activation quantization of a whole model (recipe step 5 of quant.pipeline).

Layer by layer (sequential) so memory stays low: the calibration windows are pushed through the
decoder one layer at a time; for each layer the input Hessians of its linear layers are collected,
the layer is quantized (RTN / GPTQ / learned clipping / both, per ``recipe.weight_method``), and
its *quantized* outputs become the next layer's calibration inputs. The lm_head is calibrated on
the final-norm outputs. Layers matching ``high_precision_layers`` use ``high_precision_bits``
(8-bit layers always use RTN: its error is negligible there). With ``block_tune_steps`` > 0 each
block is then tuned against the float block's output (quant/blocktune.py) before its outputs move on.

Embedding table and RMSNorm weights are rounded to fp16 in place (the package stores them as
fp16), so the torch model and the package agree exactly.
"""
from __future__ import annotations

import fnmatch
import time

import torch
from torch import nn

from algo.calib import capture_layer0_inputs
from algo.common import AccllmError

from .gptq import clip_search, gptq_quantize
from .qlinear import QLinear
from .quantizers import check_bits, check_group, quantize_weight_rtn


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QLinear))]


def layer_bits(name: str, recipe) -> int:
    if not recipe.weight_bits:
        return 0
    if any(fnmatch.fnmatch(name, p) for p in recipe.high_precision_layers):
        return recipe.high_precision_bits
    return recipe.weight_bits


def check_model(model, recipe) -> None:
    """Refuse a recipe/model combination before any work (bits, group sizes)."""
    for name in linear_names(model):
        bits = layer_bits(name, recipe)
        if not bits:
            continue
        check_bits(bits)
        mod = model.get_submodule(name)
        check_group(mod.in_features, recipe.group_size, name)


def _set_module(model, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _relative_error(W, What, H) -> float:
    d = (W.double() - What.double())
    num = torch.einsum("nk,kl,nl->", d, H.double(), d)
    den = torch.einsum("nk,kl,nl->", W.double(), H.double(), W.double())
    return float(num / den) if den > 0 else 0.0


def quantize_linear(lin: nn.Linear, name: str, recipe, H: torch.Tensor | None, method: str | None = None):
    """Quantize one nn.Linear (with its ``accllm_mask``, if pruned) into a QLinear; returns
    (QLinear, report dict)."""
    bits = layer_bits(name, recipe)
    mask = getattr(lin, "accllm_mask", None)
    W = lin.weight.detach().float()
    kw = dict(act_bits=recipe.act_bits, act_scheme=recipe.act_scheme,
              mask=None if mask is None else mask.bool())
    if not bits:
        q = QLinear.from_linear(lin, bits=0, group=recipe.group_size, float_weight=W.half().float(), **kw)
        return q, {"bits": 0}
    g = recipe.group_size
    method = method or recipe.weight_method
    if H is None or bits == 8:
        method = "rtn"
    t0 = time.time()
    if method == "rtn":
        codes, zeros, scales = quantize_weight_rtn(W, bits, g, mask=mask)
    elif method == "clip":
        hi, lo = clip_search(W, H, bits, g, mask)
        codes, zeros, scales = _rtn_clipped(W, bits, g, hi, lo, mask)
    elif method == "gptq":
        codes, zeros, scales = gptq_quantize(W, H, bits, g, mask, act_order=bool(recipe.act_order))
    elif method == "gptq+clip":
        hi, lo = clip_search(W, H, bits, g, mask)
        codes, zeros, scales = gptq_quantize(W, H, bits, g, mask, clip_hi=hi, clip_lo=lo,
                                             act_order=bool(recipe.act_order))
    else:
        raise AccllmError(f"unknown weight_method {method!r}; accepted: rtn, gptq, clip, gptq+clip")
    q = QLinear.from_linear(lin, bits=bits, group=g, codes=codes, zeros=zeros, scales=scales, **kw)
    rep = {"bits": bits, "method": method, "seconds": round(time.time() - t0, 3)}
    if H is not None:
        rep["rel_out_err"] = _relative_error(W, q.weight, H)
    return q, rep


def _rtn_clipped(W, bits, g, hi, lo, mask):
    from .quantizers import group_params, quantize_codes
    n, k = W.shape
    Wm = (W * mask if mask is not None else W).reshape(n, k // g, g)
    s, z = group_params(Wm, bits, hi, lo)
    codes = quantize_codes(Wm, s, z, bits)
    if mask is not None:
        codes = torch.where(mask.reshape(n, k // g, g), codes, z[..., None].expand_as(codes))
    return codes.reshape(n, k).to(torch.uint8), z.to(torch.uint8), s.to(torch.float16)


class _HessianCollector:
    """Forward pre-hooks that accumulate H = 2/n Σ x xᵀ for each named linear (shared inputs
    computed once)."""

    def __init__(self, mods: dict[str, nn.Module]):
        self.H = {n: None for n in mods}
        self.count = {n: 0 for n in mods}
        self._last = (None, None)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in mods.items()]

    def _hook(self, name):
        def hook(mod, args):
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).float()
            if self._last[0] is args[0]:          # q/k/v (gate/up) share one input tensor
                xtx = self._last[1]
            else:
                xtx = (x2.T @ x2).double()
                self._last = (args[0], xtx)          # the reference keeps the identity valid
            self.H[name] = xtx if self.H[name] is None else self.H[name] + xtx
            self.count[name] += x2.shape[0]
        return hook

    def hessians(self) -> dict[str, torch.Tensor]:
        return {n: (2.0 * h / max(self.count[n], 1)).float() for n, h in self.H.items() if h is not None}

    def remove(self):
        for h in self.handles:
            h.remove()


class _AbsMax:
    def __init__(self, mods: dict[str, nn.Module]):
        self.absmax = {n: 0.0 for n in mods}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in mods.items()]

    def _hook(self, name):
        def hook(mod, args):
            self.absmax[name] = max(self.absmax[name], float(args[0].detach().abs().max()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _round_fp16_(model) -> None:
    """Embedding table and RMSNorm weights to fp16 values, in place (what the package stores)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight") or name.endswith("norm.weight"):
                p.copy_(p.to(torch.float16).float())


def _finish_act(model, recipe, absmax: dict[str, float], prefix: str = "") -> None:
    """Static activation scales (per_tensor) of the QLinear layers of *model* (a whole model, or one
    block or layer whose module names carry *prefix*), and their activation quantization switched on."""
    from .quantizers import fp16_scale
    qmax = (1 << (recipe.act_bits - 1)) - 1 if recipe.act_bits else 0
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            name = f"{prefix}.{name}" if prefix and name else (prefix or name)
            if recipe.act_bits and recipe.act_scheme == "per_tensor":
                if name not in absmax:
                    raise AccllmError(f"no calibration data reached {name} for its static activation scale")
                m.act_scale = fp16_scale(torch.tensor(max(absmax[name], 1e-8) / qmax))
            m.act_enabled = True


@torch.no_grad()
def quantize_model(model, recipe, calib: torch.Tensor | None, progress: bool = True) -> dict:
    """Replace every nn.Linear of *model* by a QLinear per *recipe*; see the module doc. The work is
    done block by block by a :class:`LayerQuantizer` (the block-streamed build drives one the same way)."""
    check_model(model, recipe)
    teacher = None
    if recipe.qat_steps > 0:
        import copy
        teacher = copy.deepcopy(model)           # the float model, for distillation after PTQ
    q = LayerQuantizer(model, recipe, calib, progress=progress)
    q.start()
    for i in range(len(q.layers)):
        q.layer(i)
    q.finish_lm_head()
    _finish_act(model, recipe, q.absmax_all)
    if recipe.qat_steps > 0 and calib is not None:
        from .qat import distill
        q.report["qat"] = distill(model, recipe, calib, teacher=teacher, progress=progress)
        del teacher
    return q.finish()


class LayerQuantizer:
    """Weight and activation quantization of one model, one decoder block at a time: :meth:`start`
    (embedding and final norm rounded to fp16; the calibration inputs of block 0), :meth:`layer` for
    blocks 0, 1, … in order (Hessians on the outputs of the quantized blocks before it, GPTQ / RTN,
    block tuning against the float block; its norms rounded to fp16 first), :meth:`finish_lm_head`,
    :meth:`finish` (the report). Between blocks its state (:meth:`state` / :meth:`set_state`) is the
    quantized and float calibration streams, the activation maxima and the report."""

    def __init__(self, model, recipe, calib: torch.Tensor | None, progress: bool = True):
        self.model, self.recipe, self.calib, self.progress = model, recipe, calib, progress
        self.need_h = bool(recipe.weight_bits) and recipe.weight_method != "rtn"
        self.need_act = bool(recipe.act_bits) and recipe.act_scheme == "per_tensor"
        self.tune = recipe.block_tune_steps > 0 and bool(recipe.weight_bits)
        if calib is None and self.tune:
            raise AccllmError(f"block_tune_steps={recipe.block_tune_steps} needs calibration windows (WikiText-2 valid); "
                              f"pass calib, or set block_tune_steps=0")
        self.sequential = calib is not None and (self.need_h or self.need_act or self.tune)
        self.layers = model.model.layers
        self.report: dict = {"layers": {}}
        self.absmax_all: dict[str, float] = {}
        self.inps = self.kws = self.fp_inps = None
        self.t0 = time.time()
        self.bar = None

    def _progress_bar(self):
        from tqdm.auto import tqdm
        if self.bar is None:
            desc = f"quantize ({self.recipe.weight_method if self.need_h else 'act'})" if self.sequential else "quantize (rtn)"
            self.bar = tqdm(total=len(self.layers) + 1, desc=desc, disable=not self.progress, leave=False)
        return self.bar

    def start(self) -> None:
        self.t0 = time.time()
        inner = self.model.model
        with torch.no_grad():       # what the package stores: fp16 embedding and norms
            for p in (inner.embed_tokens.weight, inner.norm.weight):
                p.copy_(p.to(torch.float16).float())
        if self.tune:
            self.report["block_tune"] = {}
        if not self.sequential:
            return
        pairs = capture_layer0_inputs(self.model, self.calib, 4)
        self.inps, self.kws = [h for h, _ in pairs], [kw for _, kw in pairs]
        self.fp_inps = list(self.inps) if self.tune else None      # the float model's stream (block-tuning targets)

    def state(self) -> dict:
        return {"inps": self.inps, "kws": self.kws, "fp_inps": self.fp_inps, "report": self.report,
                "absmax_all": self.absmax_all, "elapsed": time.time() - self.t0}

    def set_state(self, st: dict) -> None:
        self.inps, self.kws, self.fp_inps = st["inps"], st["kws"], st["fp_inps"]
        self.report, self.absmax_all = st["report"], st["absmax_all"]
        self.t0 = time.time() - st["elapsed"]

    def _replace(self, block_prefix: str, block: nn.Module, hessians: dict | None) -> None:
        for lname, lin in list(block.named_modules()):
            if not isinstance(lin, nn.Linear):
                continue
            full = f"{block_prefix}.{lname}" if block_prefix else lname
            q, rep = quantize_linear(lin, full, self.recipe, (hessians or {}).get(lname))
            q.act_enabled = False
            _set_module(block, lname, q)
            self.report["layers"][full] = rep

    @torch.no_grad()
    def layer(self, i: int) -> None:
        """Quantize decoder block *i* (blocks before it are done) and move the calibration streams past it."""
        recipe, layer, bar = self.recipe, self.layers[i], self._progress_bar()
        _round_fp16_(layer)
        if not self.sequential:
            self._replace(f"model.layers.{i}", layer, None)
            bar.update(1)
            return
        inps, kws = self.inps, self.kws
        lins = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        hess = None
        if self.need_h:
            col = _HessianCollector(lins)
            try:
                for x, kw in zip(inps, kws):
                    layer(x, **kw)
            finally:
                col.remove()
            hess = col.hessians()
            del col
        targets = None
        if self.tune:
            targets = [layer(x, **kw) for x, kw in zip(self.fp_inps, kws)]   # still the float block
        self._replace(f"model.layers.{i}", layer, hess)
        del hess
        if self.tune:
            from .blocktune import tune_block
            bt = tune_block(layer, inps, kws, targets, recipe.block_tune_steps, recipe.block_tune_lr, seed=recipe.seed + i,
                            tokens=recipe.block_tune_tokens)
            self.report["block_tune"][f"model.layers.{i}"] = bt
            self.fp_inps = targets
            if bt.get("mse_before"):
                bar.set_postfix(layer=i, tuned_mse=f"x{bt['mse_after'] / bt['mse_before']:.2f}")
        qmods = {n: m for n, m in layer.named_modules() if isinstance(m, QLinear)}
        am = _AbsMax(qmods)
        try:
            self.inps = [layer(x, **kw) for x, kw in zip(inps, kws)]
        finally:
            am.remove()
        self.absmax_all.update({f"model.layers.{i}.{n}": v for n, v in am.absmax.items()})
        bar.update(1)
        if not self.tune:
            bar.set_postfix(layer=i)

    @torch.no_grad()
    def finish_lm_head(self) -> None:
        """lm_head: on the final-norm outputs of the quantized stack (RTN without calibration)."""
        model, recipe, bar = self.model, self.recipe, self._progress_bar()
        if not self.sequential:
            q, rep = quantize_linear(model.lm_head, "lm_head", recipe, None)
            model.lm_head = q
            self.report["layers"]["lm_head"] = rep
            bar.update(1)
            bar.close()
            return
        normed = [model.model.norm(x) for x in self.inps]
        self.inps = self.fp_inps = None
        hess = None
        if self.need_h and layer_bits("lm_head", recipe) not in (0, 8):
            col = _HessianCollector({"lm_head": model.lm_head})
            try:
                for x in normed:
                    model.lm_head(x)
            finally:
                col.remove()
            hess = col.hessians()
        self.absmax_all["lm_head"] = max(float(x.abs().max()) for x in normed)
        q, rep = quantize_linear(model.lm_head, "lm_head", recipe, (hess or {}).get("lm_head"))
        model.lm_head = q
        self.report["layers"]["lm_head"] = rep
        bar.update(1)
        bar.close()

    def finish(self) -> dict:
        report = self.report
        report["seconds"] = round(time.time() - self.t0, 3)
        if self.sequential:
            errs = [r["rel_out_err"] for r in report["layers"].values() if "rel_out_err" in r]
            if errs:
                report["mean_rel_out_err"] = sum(errs) / len(errs)
        return report
