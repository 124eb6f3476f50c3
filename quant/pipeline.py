"""The recipe pipeline: turns a loaded float model into the compressed model a recipe describes.

Order (data flows one way):
  0. outlier smoothing (optional)    quant.smooth.smooth_model     (folded into norms / v / up rows)
  1. N:M pruning                     algo.prune.prune_model        (calibrated on WikiText-2 valid)
  2. KV-cache quantization hook      quant.kv.make_kv_hook         (applied as the cache is written)
  3. attention: full or Λ-shaped     algo.attention.make_cache_factory (takes the KV hook)
  4. SpAtten token / head pruning    algo.spatten.install
  5. weight + activation quantization quant.quantize.quantize_model (respects pruning masks)
The result is a torch model with fake-quant numerics plus the per-session cache factory, wrapped
as a Scorer for the one perplexity harness (algo.eval).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from algo.eval import HFScorer
from algo.models import LoadedModel
from algo.recipe import Recipe, _ratio_active


@dataclass
class Prepared:
    loaded: LoadedModel
    recipe: Recipe
    cache_factory: object = None
    report: dict = field(default_factory=dict)   # per-step facts (timings, masks, quantizer stats)

    def scorer(self, name: str | None = None) -> HFScorer:
        return HFScorer(self.loaded.model, cache_factory=self.cache_factory, name=name or self.recipe.name)


def needs_calibration(recipe: Recipe) -> bool:
    return bool(recipe.nm and recipe.prune_method != "magnitude") or bool(recipe.weight_bits and recipe.weight_method != "rtn") \
        or bool(recipe.kv_bits) or (bool(recipe.act_bits) and recipe.act_scheme == "per_tensor") or recipe.qat_steps > 0 \
        or recipe.smooth_alpha > 0 or bool((recipe.weight_bits or recipe.nm) and recipe.block_tune_steps > 0)


def prepare(loaded: LoadedModel, recipe: Recipe, progress: bool = True) -> Prepared:
    """Apply *recipe* to *loaded* in place and return the prepared model."""
    prepared = Prepared(loaded, recipe)
    steps = prepared.report.setdefault("steps", {})
    calib = None
    if needs_calibration(recipe):
        from algo.data import calibration_batches
        calib = calibration_batches(loaded.tokenizer, recipe.calib_samples, recipe.calib_seqlen, recipe.seed)

    def timed(name, fn):
        t0 = time.time()
        out = fn()
        steps[name] = {"seconds": round(time.time() - t0, 3)}
        if isinstance(out, dict):
            steps[name].update(out)
        return out

    if recipe.smooth_alpha > 0:
        from quant.smooth import smooth_model
        timed("smooth", lambda: smooth_model(loaded.model, recipe, calib, progress=progress))
    if recipe.nm:
        from algo.prune import prune_model
        from quant.blocktune import tune_block
        timed("prune", lambda: prune_model(loaded.model, recipe, calib, progress=progress, tune_block=tune_block))
    kv_hook = None
    if recipe.kv_bits:
        from quant.kv import make_kv_hook
        kv_hook = timed("kv_calibrate", lambda: make_kv_hook(loaded.model, recipe, calib, progress=progress))
        steps["kv_calibrate"] = {"seconds": steps["kv_calibrate"]["seconds"]}
    if recipe.attention != "full" or kv_hook is not None:
        from quant.kv import _cache_factory_for   # algo.attention's factory; full-attention fallback
        prepared.cache_factory = _cache_factory_for(loaded.model, recipe, kv_hook)
    if _ratio_active(recipe.token_keep) or _ratio_active(recipe.head_keep):
        from algo.spatten import install
        timed("spatten", lambda: install(loaded.model, recipe))
    if recipe.weight_bits or recipe.act_bits:
        from quant.quantize import quantize_model
        timed("quantize", lambda: quantize_model(loaded.model, recipe, calib, progress=progress))
    return prepared
