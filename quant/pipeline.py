"""The recipe pipeline: turns a loaded float model into the compressed model a recipe describes.

Order (data flows one way): N:M pruning (algo) → attention transforms (algo: Λ, SpAtten) →
quantization (quant: weights, activations, KV cache). The result is a torch model with
fake-quant numerics plus the per-session cache factory, wrapped as a Scorer for the one
perplexity harness.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from algo.eval import HFScorer
from algo.models import LoadedModel
from algo.recipe import Recipe


@dataclass
class Prepared:
    loaded: LoadedModel
    recipe: Recipe
    cache_factory: object = None
    report: dict = field(default_factory=dict)   # per-step facts (timings, masks, quantizer stats)

    def scorer(self, name: str | None = None) -> HFScorer:
        return HFScorer(self.loaded.model, cache_factory=self.cache_factory, name=name or self.recipe.name)


def prepare(loaded: LoadedModel, recipe: Recipe, progress: bool = True) -> Prepared:
    """Apply *recipe* to *loaded* in place and return the prepared model."""
    prepared = Prepared(loaded, recipe)
    return prepared
