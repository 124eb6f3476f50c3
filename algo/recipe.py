"""Compression recipes: one typed, validated set of settings for every stage.

A recipe is a named preset, optionally updated from a TOML/JSON file (``--recipe-file``) and
then from ``--set key=value`` overrides, in that order. Every key is declared here with its type,
accepted values and meaning; an unknown key or a bad value is refused before any work starts.
The recipe round-trips to JSON and is stored whole in each compiled package's manifest.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .common import AccllmError


def _key(default, doc, choices=None, check=None):
    return field(default=default, metadata={"doc": doc, "choices": choices, "check": check})


def _list_key(default, doc):
    return field(default_factory=lambda: list(default), metadata={"doc": doc, "choices": None, "check": None})


def _keep_ratio(v):
    vals = v if isinstance(v, list) else [v]
    for x in vals:
        if not isinstance(x, (int, float)) or not (0.0 < float(x) <= 1.0):
            return f"keep ratios must lie in (0, 1], got {x!r}"
    return None


def _sparsity(v):
    if v in ("", "none"):
        return None
    try:
        n, m = (int(x) for x in str(v).split(":"))
    except ValueError:
        return f"sparsity must be 'N:M' (e.g. '2:4', '4:8', '1:4') or 'none', got {v!r}"
    if not (0 < n < m):
        return f"sparsity N:M needs 0 < N < M, got {v!r}"
    return None


def _alpha(v):
    return None if isinstance(v, (int, float)) and 0.0 <= float(v) < 1.0 else \
        f"must be a number in [0, 1) (0 = off), got {v!r}"


def _positive(v):
    return None if isinstance(v, int) and v > 0 else f"must be a positive integer, got {v!r}"


def _lr(v):
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < float(v) <= 1.0 else \
        f"must be a number in (0, 1], got {v!r}"


def _non_negative(v):
    return None if isinstance(v, int) and v >= 0 else f"must be a non-negative integer, got {v!r}"


def _check_type(f, v) -> None:
    """The value of recipe key *f* has the type of its default: true/false for flags (not 0/1), a whole
    number for integer keys (not 2.0 or true), a finite number for real keys, a list of names for lists."""
    import math
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        ok, what = isinstance(v, bool), "true or false"
    elif isinstance(default, int) and f.type != "Any":
        ok, what = isinstance(v, int) and not isinstance(v, bool), "an integer"
    elif isinstance(default, float) or f.type == "Any":
        nums = v if f.type == "Any" and isinstance(v, list) else [v]
        ok = bool(nums) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                for x in nums)
        what = "a finite number" + (" or a list of them" if f.type == "Any" else "")
    elif isinstance(default, list):
        ok, what = isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"
    else:
        ok, what = isinstance(v, str), "a string"
    if not ok:
        raise AccllmError(f"recipe key {f.name} takes {what}, got {v!r}")


@dataclass
class Recipe:
    name: str = _key("custom", "preset name this recipe started from")
    # --- weights (quant/) -------------------------------------------------------------------
    weight_bits: int = _key(0, "weight bits of linear layers (0 = keep float)", choices=(0, 2, 3, 4, 8))
    group_size: int = _key(64, "weight quantization group along the input dimension (must divide K)",
                           choices=(32, 64, 128))
    weight_method: str = _key("gptq", "weight quantizer calibration: rtn | gptq | clip (learned "
                              "clipping, OmniQuant-style) | gptq+clip", choices=("rtn", "gptq", "clip", "gptq+clip"))
    act_order: bool = _key(False, "GPTQ column order: decreasing Hessian diagonal, with group parameters "
                           "fixed before the updates (groups stay contiguous); gptq and gptq+clip only")
    high_precision_layers: list = _list_key(["lm_head"], "linear layers kept at higher precision "
                                            "(name patterns, fnmatch on module names, e.g. 'lm_head', "
                                            "'model.layers.0.*')")
    high_precision_bits: int = _key(8, "bits for high_precision_layers (0 = float)", choices=(0, 4, 8))
    # --- activations ------------------------------------------------------------------------
    act_bits: int = _key(0, "input activation bits of linear layers (0 = float)", choices=(0, 8))
    act_scheme: str = _key("per_token", "activation scales: per_token (dynamic) | per_tensor (static, "
                           "calibrated)", choices=("per_token", "per_tensor"))
    smooth_alpha: float = _key(0.0, "outlier smoothing of linear inputs (SmoothQuant-style, migration strength "
                               "alpha; 0 = off): per-channel factors folded into the RMSNorm weights (q/k/v, "
                               "gate/up inputs), v_proj rows (o_proj input) and up_proj rows (down_proj input)",
                               check=_alpha)
    # --- KV cache ---------------------------------------------------------------------------
    kv_bits: int = _key(0, "KV-cache bits (0 = float); keys per channel, values per token", choices=(0, 4, 8))
    kv_key_rope: str = _key("post", "keys quantized after RoPE (post: as stored; what the accelerator runs) or "
                            "before it (pre: KVQuant-style, rotated on read; fake-quant only, the compiler "
                            "refuses it until the KV-cache unit rotates keys on read)", choices=("post", "pre"))
    kv_key_token_scale: bool = _key(False, "keys: static per-channel centre and range plus one dynamic fp16 scale "
                                    "per key token (fake-quant only; the compiler refuses it until the KV-cache "
                                    "unit computes it on append)")
    kv_group_size: int = _key(64, "KV quantization group (tokens for keys, channels for values)",
                              choices=(16, 32, 64, 128))
    # --- calibration / training -------------------------------------------------------------
    calib_samples: int = _key(64, "calibration windows from WikiText-2 valid", check=_positive)
    calib_seqlen: int = _key(512, "tokens per calibration window", check=_positive)
    qat_steps: int = _key(0, "quantization-aware training / distillation steps after PTQ (0 = off)",
                          check=_non_negative)
    block_tune_steps: int = _key(0, "block-wise reconstruction after the PTQ of each decoder block (quant/"
                                 "blocktune.py): Adam steps on the codes (straight-through) and log-scales "
                                 "against the float block's output — or, for N:M pruning without weight "
                                 "quantization, on the kept float weights; 0 = off", check=_non_negative)
    block_tune_lr: float = _key(0.03, "block-wise reconstruction learning rate (in quantization steps for the "
                                "codes, relative for the scales)", check=_lr)
    block_tune_tokens: int = _key(0, "block-wise reconstruction: at most this many tokens of a calibration "
                                  "window per step (its first min(T, calib_seqlen) tokens, exact under causal "
                                  "attention; fewer = cheaper steps); 0 = the whole window", check=_non_negative)
    seed: int = _key(0, "random seed for calibration sampling", check=_non_negative)
    # --- N:M pruning (algo/) ----------------------------------------------------------------
    sparsity: str = _key("none", "N:M semi-structured sparsity along K: none | 2:4 | 4:8 | 1:4", check=_sparsity)
    prune_method: str = _key("sparsegpt", "pruning selection: magnitude | wanda | sparsegpt",
                             choices=("magnitude", "wanda", "sparsegpt"))
    prune_skip: list = _list_key(["lm_head"], "linear layers left dense (name patterns)")
    # --- Λ-shaped attention -----------------------------------------------------------------
    attention: str = _key("full", "attention: full | lambda (sink tokens + recent window)",
                          choices=("full", "lambda"))
    sink_tokens: int = _key(4, "Λ-shaped attention: sink tokens kept from the start", check=_non_negative)
    window: int = _key(1024, "Λ-shaped attention: most recent tokens kept", check=_positive)
    rope_mode: str = _key("cache", "positions for RoPE under Λ: cache (position within the kept cache) | "
                          "original (absolute position)", choices=("cache", "original"))
    # --- SpAtten cascade token / head pruning -----------------------------------------------
    token_keep: Any = _key(1.0, "SpAtten token keep ratio per layer (a number, or a list with one per "
                           "layer); 1.0 = off", check=_keep_ratio)
    head_keep: Any = _key(1.0, "SpAtten head keep ratio per layer (number or list); 1.0 = off",
                          check=_keep_ratio)
    spatten_start_layer: int = _key(2, "first layer at which tokens/heads may be pruned", check=_non_negative)
    spatten_recent: int = _key(128, "SpAtten: most recent tokens always read (never token-pruned; capped at "
                               "window under Λ)", check=_positive)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self) -> "Recipe":
        for f in fields(self):
            v = getattr(self, f.name)
            _check_type(f, v)
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            if choices is not None and v not in choices:
                raise AccllmError(f"recipe key {f.name}={v!r} is not accepted; choose one of "
                                  f"{', '.join(map(str, choices))}")
            if check is not None:
                msg = check(v)
                if msg:
                    raise AccllmError(f"recipe key {f.name}: {msg}")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.sparsity in ("", "none"):
            return None
        n, m = (int(x) for x in self.sparsity.split(":"))
        return n, m

    def summary(self) -> str:
        parts = []
        if self.nm:
            parts.append(f"{self.sparsity} ({self.prune_method})")
        if self.weight_bits:
            method = self.weight_method + (", act order" if self.act_order and "gptq" in self.weight_method else "")
            if self.block_tune_steps:
                method += f", block tune {self.block_tune_steps} steps"
                if 0 < self.block_tune_tokens < self.calib_seqlen:
                    method += f" × {self.block_tune_tokens} tokens"
            parts.append(f"W{self.weight_bits} g{self.group_size} ({method})")
        if self.act_bits:
            parts.append(f"A{self.act_bits} ({self.act_scheme})")
        if self.kv_bits:
            keys = [x for x, on in (("keys pre-RoPE", self.kv_key_rope == "pre"),
                                    ("per-token key scale", self.kv_key_token_scale)) if on]
            parts.append(f"KV{self.kv_bits}" + (f" ({', '.join(keys)})" if keys else ""))
        if self.attention == "lambda":
            parts.append(f"Λ S={self.sink_tokens} W={self.window}")
        if _ratio_active(self.token_keep) or _ratio_active(self.head_keep):
            parts.append(f"SpAtten tokens {self.token_keep} heads {self.head_keep}")
        return ", ".join(parts) or "float (no compression)"


def _ratio_active(v) -> bool:
    return any(float(x) < 1.0 for x in (v if isinstance(v, list) else [v]))


KEYS = {f.name: f for f in fields(Recipe)}

PRESETS: dict[str, dict] = {
    "fp": dict(),
    "a8": dict(act_bits=8, smooth_alpha=0.5),
    # KV4: keys quantized before RoPE, static per-channel centre/range + a dynamic scale per key
    # (measured on SmolLM2-135M 1.022; the accelerator's format — post-RoPE static keys — 1.072; README)
    "kv4": dict(kv_bits=4, kv_key_rope="pre", kv_key_token_scale=True),
    "w8": dict(weight_bits=8),
    # W4: the best method measured on SmolLM2-135M (README): learned clipping fixes the static groups,
    # GPTQ in act order, 128 calibration windows (ratio 1.079; plain GPTQ 1.172)
    "w4": dict(weight_bits=4, weight_method="gptq+clip", act_order=True, calib_samples=128),
    # W3 / W2: GPTQ in act order, then block-wise reconstruction (256 steps per block): measured on
    # SmolLM2-135M, W3 1.210 and W2 2.128 (plain GPTQ 2.218 and 111.5; README)
    "w3": dict(weight_bits=3, act_order=True, block_tune_steps=256),
    "w2": dict(weight_bits=2, act_order=True, block_tune_steps=256),
    # W2A8KV4: GPTQ in act order + block-wise reconstruction on the first 256 tokens of each window (so
    # compile-model stays within 15 min on 2 cores): measured on SmolLM2-135M 2.756 (whole windows 2.248 but
    # past the budget; plain GPTQ 151.6; README)
    "w2a8kv4": dict(weight_bits=2, act_bits=8, kv_bits=4, act_order=True, block_tune_steps=256,
                    block_tune_tokens=256),
    # 2:4: SparseGPT, then block-wise reconstruction of the kept weights (measured on SmolLM2-135M 1.509;
    # SparseGPT alone 2.35; README)
    "sparse24": dict(sparsity="2:4", block_tune_steps=256),
    "lambda": dict(attention="lambda", sink_tokens=4, window=1024),
    "spatten": dict(token_keep=0.5, head_keep=0.9),
    # AccLLM: 2:4 (SparseGPT) + Λ + W2A8KV4, GPTQ in act order + block-wise reconstruction (256 steps on
    # whole windows): measured on SmolLM2-135M 3.640 (plain GPTQ: 8783 ppl; README)
    "accllm": dict(sparsity="2:4", attention="lambda", sink_tokens=4, window=1024,
                   weight_bits=2, act_bits=8, kv_bits=4, act_order=True, block_tune_steps=256),
}
PRESET_DOCS = {
    "fp": "no compression (the reference)",
    "a8": "8-bit activations only",
    "kv4": "4-bit KV cache only (keys before RoPE + per-token key scale; compile for --hw with "
           "--set kv_key_rope=post --set kv_key_token_scale=false)",
    "w8": "8-bit weights only",
    "w4": "4-bit weights, group 64 (GPTQ act order + learned clipping, 128 calibration windows)",
    "w3": "3-bit weights, group 64, GPTQ in act order + block-wise reconstruction",
    "w2": "2-bit weights, group 64, GPTQ in act order + block-wise reconstruction",
    "w2a8kv4": "2-bit weights, 8-bit activations, 4-bit KV cache (GPTQ act order + block-wise reconstruction)",
    "sparse24": "2:4 weight pruning (SparseGPT + block-wise reconstruction of the kept weights)",
    "lambda": "Λ-shaped attention, 4 sink tokens + 1024-token window",
    "spatten": "SpAtten cascade token and head pruning",
    "accllm": "AccLLM: 2:4 pruning + Λ-shaped attention + W2A8KV4 (GPTQ act order + block-wise reconstruction)",
}


def _coerce(key: str, raw: Any) -> Any:
    f = KEYS[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if not isinstance(raw, str):
        return raw
    s = raw.strip()
    if isinstance(default, bool):
        if s.lower() in ("1", "true", "yes", "on"):
            return True
        if s.lower() in ("0", "false", "no", "off"):
            return False
        raise AccllmError(f"recipe key {key} takes true/false, got {raw!r}")
    if isinstance(default, list):
        return [x.strip() for x in s.split(",") if x.strip()] if s else []
    if key in ("token_keep", "head_keep"):
        try:
            vals = [float(x) for x in s.split(",")]
        except ValueError:
            raise AccllmError(f"recipe key {key} takes a number or a comma-separated list, got {raw!r}") from None
        return vals[0] if len(vals) == 1 else vals
    if isinstance(default, int):
        try:
            return int(s, 0)
        except ValueError:
            raise AccllmError(f"recipe key {key} takes an integer, got {raw!r}") from None
    if isinstance(default, float):
        try:
            return float(s)
        except ValueError:
            raise AccllmError(f"recipe key {key} takes a number, got {raw!r}") from None
    return s


def _apply(recipe: Recipe, updates: dict, origin: str) -> None:
    for k, v in updates.items():
        if k not in KEYS:
            raise AccllmError(f"{origin}: unknown recipe key {k!r}; known keys: {', '.join(KEYS)}")
        setattr(recipe, k, _coerce(k, v))


def load_recipe(name: str | None = "fp", recipe_file: str | None = None, sets: list[str] | None = None) -> Recipe:
    """Build a validated recipe: preset *name*, then *recipe_file* (TOML or JSON), then ``key=value`` sets."""
    name = name or "fp"
    if name not in PRESETS:
        raise AccllmError(f"unknown recipe {name!r}; named recipes: {', '.join(PRESETS)} "
                          f"(or --recipe-file FILE)")
    r = Recipe(name=name)
    _apply(r, PRESETS[name], f"preset {name}")
    if recipe_file:
        p = Path(recipe_file)
        if not p.is_file():
            raise AccllmError(f"recipe file {recipe_file} not found")
        try:
            data = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(p.read_text())
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise AccllmError(f"recipe file {p}: cannot parse ({e}); TOML or JSON is accepted") from None
        if "recipe" in data and isinstance(data["recipe"], dict):
            data = data["recipe"]
        _apply(r, data, f"recipe file {p}")
    for s in sets or []:
        if "=" not in s:
            raise AccllmError(f"--set takes key=value, got {s!r}")
        k, v = s.split("=", 1)
        _apply(r, {k.strip(): v}, "--set")
    return r.validate()


# keys that decide only how attention runs, not the compressed tensors (so an existing package can take them)
ATTENTION_TIME_KEYS = ("token_keep", "head_keep", "spatten_start_layer", "spatten_recent")


def apply_attention_sets(recipe: Recipe, sets: list[str]) -> Recipe:
    """A copy of *recipe* with ``key=value`` sets of ATTENTION_TIME_KEYS applied (others refused)."""
    r = recipe_from_dict(recipe.to_dict())
    for s in sets:
        if "=" not in s:
            raise AccllmError(f"--set takes key=value, got {s!r}")
        k, v = (x.strip() for x in s.split("=", 1))
        if k not in ATTENTION_TIME_KEYS:
            raise AccllmError(f"--set {k}: with --package only keys that do not change the compressed weights "
                              f"can be set ({', '.join(ATTENTION_TIME_KEYS)}); {k} needs a full compile (without "
                              f"--package)")
        _apply(r, {k: v}, "--set")
    return r.validate()


def recipe_from_dict(d: dict) -> Recipe:
    r = Recipe()
    _apply(r, d, "recipe")
    return r.validate()


def describe_presets() -> str:
    return "\n".join(f"  {k:<9} {PRESET_DOCS[k]}" for k in PRESETS)


def describe_keys() -> str:
    out = []
    for f in fields(Recipe):
        d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(f"  {f.name:<20} {f.metadata['doc']} [default {d!r}]")
    return "\n".join(out)
