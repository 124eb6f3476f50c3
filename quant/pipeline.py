"""The recipe pipeline: turns a loaded float model into the compressed model a recipe describes.

It is a fixed sequence of named steps (:data:`COMPRESS_STEPS`); a step whose recipe keys are off does
not run. Data flows one way:
  smooth        outlier smoothing (smooth_alpha)        quant.smooth.smooth_model (folded into norms / v / up rows)
  prune         N:M pruning (nm)                        algo.prune.prune_model, block tuning by quant.blocktune
  kv-calibrate  KV-cache quantizer constants (kv_bits)  quant.kv.make_kv_hook (applied as the cache is written)
  attention     Λ-shaped cache, SpAtten pruning         algo.attention.make_cache_factory, algo.spatten.install
  quantize      weight + activation quantization        quant.quantize.quantize_model (respects pruning masks)
Calibration text (WikiText-2 valid windows, drawn from the recipe's seed) is cut once, on first use.
The result is a torch model with fake-quant numerics plus the per-session cache factory, wrapped as a
Scorer for the one perplexity harness (algo.eval). ``compile-model`` runs the same steps one by one
(host/build.py) and can stop and resume between them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from algo.recipe import Recipe, _ratio_active

if TYPE_CHECKING:                      # kept light: compile-model's --help lists the steps from here
    from algo.eval import HFScorer
    from algo.models import LoadedModel


@dataclass
class Prepared:
    loaded: "LoadedModel"
    recipe: Recipe
    cache_factory: object = None
    report: dict = field(default_factory=dict)   # per-step facts (timings, masks, quantizer stats)

    def scorer(self, name: str | None = None) -> "HFScorer":
        from algo.eval import HFScorer
        return HFScorer(self.loaded.model, cache_factory=self.cache_factory, name=name or self.recipe.name)

    @property
    def kv_hook(self):
        """The KV hook the kv-calibrate step attached to the model (None without kv_bits)."""
        return getattr(self.loaded.model, "accllm_kv_hook", None)

    def refresh_cache_factory(self) -> None:
        """Build the per-session cache factory from the model's state (Λ window, KV hook). Called by the
        attention step, and again after a model was restored from a saved step."""
        if self.recipe.attention != "full" or self.kv_hook is not None:
            from algo.attention import make_cache_factory
            self.cache_factory = make_cache_factory(self.loaded.model, self.recipe, self.kv_hook)


def needs_calibration(recipe: Recipe) -> bool:
    return bool(recipe.nm and recipe.prune_method != "magnitude") or bool(recipe.weight_bits and recipe.weight_method != "rtn") \
        or bool(recipe.kv_bits) or (bool(recipe.act_bits) and recipe.act_scheme == "per_tensor") or recipe.qat_steps > 0 \
        or recipe.smooth_alpha > 0 or bool((recipe.weight_bits or recipe.nm) and recipe.block_tune_steps > 0)


class Calibration:
    """The calibration windows of a recipe, cut on first use (None when the recipe needs none). The draw
    depends only on the tokenizer and the recipe's calib_samples, calib_seqlen and seed, so a resumed
    build cuts the very same windows."""

    def __init__(self, tokenizer, recipe: Recipe):
        self._tokenizer, self._recipe, self._batches, self._cut = tokenizer, recipe, None, False

    def __call__(self):
        if not self._cut:
            if needs_calibration(self._recipe):
                from algo.data import calibration_batches
                r = self._recipe
                self._batches = calibration_batches(self._tokenizer, r.calib_samples, r.calib_seqlen, r.seed)
            self._cut = True
        return self._batches


def _smooth(p: Prepared, calib: Calibration, progress: bool):
    from quant.smooth import smooth_model
    return smooth_model(p.loaded.model, p.recipe, calib(), progress=progress)


def prune_calibration(recipe: Recipe, calib: Calibration):
    """The calibration windows pruning reads: none for magnitude pruning without block tuning of the kept
    weights (the selection reads no data, and its Hessians would only measure the error: hours on 7B)."""
    if recipe.prune_method == "magnitude" and not (recipe.block_tune_steps > 0 and not recipe.weight_bits):
        return None
    return calib()


def _prune(p: Prepared, calib: Calibration, progress: bool):
    from algo.prune import prune_model
    from quant.blocktune import tune_block
    return prune_model(p.loaded.model, p.recipe, prune_calibration(p.recipe, calib), progress=progress,
                       tune_block=tune_block)


def _kv_calibrate(p: Prepared, calib: Calibration, progress: bool):
    from quant.kv import make_kv_hook
    make_kv_hook(p.loaded.model, p.recipe, calib(), progress=progress)     # attaches model.accllm_kv_hook
    return {"bits": p.recipe.kv_bits, "group": p.recipe.kv_group_size}


def _attention(p: Prepared, calib: Calibration, progress: bool):
    p.refresh_cache_factory()
    info = {"attention": p.recipe.attention}
    if _spatten_active(p.recipe):
        from algo.spatten import install
        info["spatten"] = install(p.loaded.model, p.recipe)
    return info


def _quantize(p: Prepared, calib: Calibration, progress: bool):
    from quant.quantize import quantize_model
    return quantize_model(p.loaded.model, p.recipe, calib(), progress=progress)


def _spatten_active(r: Recipe) -> bool:
    return _ratio_active(r.token_keep) or _ratio_active(r.head_keep)


@dataclass(frozen=True)
class CompressStep:
    name: str
    doc: str
    applies: Callable[[Recipe], bool]
    fn: Callable[[Prepared, Calibration, bool], object]

    def run(self, prepared: Prepared, calib: Calibration, progress: bool = True) -> dict:
        """Run the step on *prepared* in place; its facts (and seconds) go to ``report["steps"][name]``."""
        t0 = time.time()
        out = self.fn(prepared, calib, progress)
        rec = {"seconds": round(time.time() - t0, 3)}
        if isinstance(out, dict):
            rec.update(out)
        prepared.report.setdefault("steps", {})[self.name] = rec
        return rec


COMPRESS_STEPS: tuple[CompressStep, ...] = (
    CompressStep("smooth", "outlier smoothing folded into norms and rows (smooth_alpha > 0)",
                 lambda r: r.smooth_alpha > 0, _smooth),
    CompressStep("prune", "N:M weight pruning with block tuning (nm)", lambda r: bool(r.nm), _prune),
    CompressStep("kv-calibrate", "KV-cache quantizer constants from calibration text (kv_bits)",
                 lambda r: bool(r.kv_bits), _kv_calibrate),
    CompressStep("attention", "Λ-shaped KV cache and SpAtten token/head pruning installed",
                 lambda r: r.attention != "full" or bool(r.kv_bits) or _spatten_active(r), _attention),
    CompressStep("quantize", "weight and activation quantization, GPTQ and block tuning (weight_bits, act_bits)",
                 lambda r: bool(r.weight_bits or r.act_bits), _quantize),
)


def prepare(loaded: "LoadedModel", recipe: Recipe, progress: bool = True) -> Prepared:
    """Apply *recipe* to *loaded* in place and return the prepared model (the recipe as it runs on the
    model's family: algo.models.family_recipe)."""
    from algo.models import family_recipe
    recipe, _ = family_recipe(recipe, loaded.config.to_dict())
    prepared = Prepared(loaded, recipe)
    calib = Calibration(loaded.tokenizer, recipe)
    for step in COMPRESS_STEPS:
        if step.applies(recipe):
            step.run(prepared, calib, progress)
    return prepared
