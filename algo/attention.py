"""Attention for accllm: full or Λ-shaped KV caches, the KV-cache hook, and the attention kernel
that SpAtten (algo/spatten.py) plugs into.

Λ-shaped attention (``recipe.attention = "lambda"``, S = ``sink_tokens``, W = ``window``)
------------------------------------------------------------------------------------------
Visibility rule (normative; the accelerator implements the same): the query at absolute position
``i`` attends to key ``j`` iff ``j <= i`` and (``j < S`` or ``j > i - W``), i.e. the S first tokens
of the stream (sinks) plus the W most recent tokens *including itself*. Within one block of T new
tokens each query gets its own band (a banded mask, not one set for the whole block).

What the cache stores (per layer, per KV head): the S sink tokens (positions 0..S-1) and the W
most recent tokens — S + W slots, constant at any stream length. While a block of T tokens is
processed the attention also reads the T new keys, so a block needs S + W + T key/value rows of
work memory (the stored S + W plus the block's own); after the block only sinks + the last W stay.
Tokens between the sinks and the window are evicted for good.

Keys are stored **after RoPE, rotated at their absolute position** (sinks at 0..S-1); values
as produced by v_proj. ``kv_hook(layer_idx, k, v)`` (the 4-bit KV fake-quantizer of quant/) is
applied to each new token's (rotated k, v) once, before it is stored and before anyone reads it,
so what attention reads is exactly what the cache holds. A hook with ``needs_rope = True``
(keys quantized before RoPE, recipe ``kv_key_rope=pre``) is called ``hook(layer_idx, k, v,
rope=(cos, sin))`` with the rotation the written keys got, so it can quantize the un-rotated key.

RoPE under Λ (``recipe.rope_mode``):

* ``cache`` (default, StreamingLLM semantics): positions *within the kept cache*. The query's
  cache position is ``c(i) = min(i, S + W - 1)``; sink s sits at cache position s; window key j at
  ``c(i) - (i - j)``. Because a RoPE score depends only on the position difference, the window part
  is identical to rotating query and key at their absolute positions, and only the sink scores
  change: they use the query rotated at ``c(i)`` instead of ``i``. So the hardware keeps keys
  rotated once at write time (no re-rotation of the cache) and rotates each query twice: at ``i``
  for the window keys and at ``min(i, S+W-1)`` for the S sink keys. Distances seen by the model
  never exceed S + W - 1, inside the trained context, at any stream length.
* ``original``: every key and query at its absolute position; the distance to the sinks grows
  without bound, past the trained context after 8192 tokens for SmolLM2.

``cache`` is the default: with it Λ measured no collapse over 32768 tokens (README). ``original``
past 8192 tokens has not been measured yet (command in README).

Full attention (``recipe.attention = "full"``) uses a transformers DynamicCache that applies the
KV hook on writes (:class:`HookedDynamicCache`); the stock attention kernels are used unless
SpAtten is installed.
"""
from __future__ import annotations

import math
import types

import torch
from torch import nn

from .common import AccllmError

try:
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
except ImportError:  # pragma: no cover - transformers is a hard dependency
    raise


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------
def check_recipe(recipe) -> None:
    if recipe.attention not in ("full", "lambda"):
        raise AccllmError(f"attention={recipe.attention!r} is not accepted; choose full or lambda")
    if recipe.attention == "lambda":
        if not isinstance(recipe.window, int) or recipe.window <= 0:
            raise AccllmError(f"Λ-shaped attention needs window W > 0, got {recipe.window!r}")
        if not isinstance(recipe.sink_tokens, int) or recipe.sink_tokens < 0:
            raise AccllmError(f"Λ-shaped attention needs sink_tokens S >= 0, got {recipe.sink_tokens!r}")
        if recipe.rope_mode not in ("cache", "original"):
            raise AccllmError(f"rope_mode={recipe.rope_mode!r} is not accepted; choose cache or original")


def kv_slots(recipe) -> int | None:
    """KV slots per layer and KV head the recipe needs (None = unbounded, full attention)."""
    return recipe.sink_tokens + recipe.window if recipe.attention == "lambda" else None


def check_fits(recipe, max_context: int) -> dict:
    """Refuse a recipe whose stored KV (S + W slots under Λ) exceeds the hardware's *max_context*
    slots per layer and KV head. Full attention fits any config; the runtime stops at
    max_context tokens. Returns {kv_slots, max_context, bounded}."""
    check_recipe(recipe)
    if not isinstance(max_context, int) or max_context <= 0:
        raise AccllmError(f"max_context must be a positive integer, got {max_context!r}")
    need = kv_slots(recipe)
    if need is not None and need > max_context:
        raise AccllmError(f"Λ-shaped attention needs S + W = {recipe.sink_tokens} + {recipe.window} = {need} KV "
                          f"slots per layer, more than the hardware's max_context {max_context}; lower "
                          f"window (--set window=N) or sink_tokens, or pick a larger hardware config")
    return {"kv_slots": need if need is not None else max_context, "max_context": max_context,
            "bounded": need is not None}


# --------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------
def _kv_geometry(config):
    hk = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, hk, d


class HookedDynamicCache(DynamicCache):
    """Full-attention DynamicCache applying ``hook(layer_idx, k, v) -> (k, v)`` to what is written."""

    def __init__(self, config, hook=None, rotary=None):
        super().__init__(config=config)
        self.accllm_hook = hook
        self.accllm_config = config
        self.rotary = rotary

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.accllm_hook is not None:
            if getattr(self.accllm_hook, "needs_rope", False):
                # a hook that quantizes keys before RoPE gets the rotation of the written positions
                # (full attention: the stream continues at the cached length)
                if self.rotary is None:
                    raise AccllmError("this KV hook quantizes keys before RoPE and needs the model's rotary "
                                      "embedding; build the cache with make_cache_factory(model, ...)")
                start = self.get_seq_length(layer_idx)
                pos = torch.arange(start, start + key_states.shape[2], device=key_states.device)[None]
                rope = self.rotary(key_states, pos)
                key_states, value_states = self.accllm_hook(layer_idx, key_states, value_states, rope=rope)
            else:
                key_states, value_states = self.accllm_hook(layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def accllm_stats(self) -> dict:
        return kv_stats_full(self, self.accllm_config)


def session_stats(cache, config) -> dict:
    """KV memory (and SpAtten read savings, when installed) of one session's cache."""
    out = cache.accllm_stats() if hasattr(cache, "accllm_stats") else kv_stats_full(cache, config)
    st = getattr(cache, "accllm_spatten_state", None)
    if st is not None:
        out.update(st.stats())
    return out


def kv_stats_full(cache, config) -> dict:
    L, hk, d = _kv_geometry(config)
    tokens = cache.get_seq_length()
    return {"kv_tokens_per_layer": tokens, "kv_tokens_peak": tokens,
            "kv_bytes_fp16_peak": int(tokens * L * 2 * hk * d * 2)}


class LambdaLayer(CacheLayerMixin):
    """One layer's Λ cache: sinks (positions < S) and the last W tokens, keys post-RoPE."""

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.k = self.v = None          # [b, hk, n, d], ascending positions: sinks then window
        self.pos = None                 # LongTensor [n] absolute positions
        self.seen = 0

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise AccllmError("the Λ cache is written by accllm's attention kernel only (algo.attention); "
                          "call make_cache_factory(model, ...) so the model's attention is patched")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def stored(self) -> int:
        return 0 if self.pos is None else int(self.pos.numel())


class LambdaCache(Cache):
    """Λ-shaped KV cache (S sinks + W recent tokens); see the module doc for the exact rule."""

    def __init__(self, config, sink_tokens: int, window: int, rope_mode: str = "cache", hook=None, rotary=None):
        L, _, _ = _kv_geometry(config)
        super().__init__(layers=[LambdaLayer() for _ in range(L)])
        self.sinks = int(sink_tokens)
        self.window = int(window)
        self.rope_mode = rope_mode
        self.accllm_hook = hook
        self.rotary = rotary
        self.accllm_config = config
        self.peak_tokens = 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0          # the mask transformers builds is ignored by our kernel

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def accllm_stats(self) -> dict:
        L, hk, d = _kv_geometry(self.accllm_config)
        now = self.layers[0].stored()
        return {"kv_tokens_per_layer": now, "kv_tokens_peak": self.peak_tokens,
                "kv_slots": self.sinks + self.window,
                "kv_bytes_fp16_peak": int(self.peak_tokens * L * 2 * hk * d * 2)}


# --------------------------------------------------------------------------------------------
# the attention kernel (patched into every LlamaAttention)
# --------------------------------------------------------------------------------------------
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope(x, cos, sin):
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def _repeat_kv(x, n_rep: int):
    if n_rep == 1:
        return x
    b, hk, n, d = x.shape
    return x[:, :, None].expand(b, hk, n_rep, n, d).reshape(b, hk * n_rep, n, d)


def _accllm_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                              cache=None, **kwargs):
    lam = cache if isinstance(cache, LambdaCache) else None
    sp = getattr(self, "accllm_spatten", None)
    if lam is None and (sp is None or cache is None):
        return self._accllm_orig_forward(hidden_states, position_embeddings=position_embeddings,
                                         attention_mask=attention_mask, cache=cache, **kwargs)
    li = self.layer_idx
    b, T = hidden_states.shape[:2]
    d = self.head_dim
    q = self.q_proj(hidden_states).view(b, T, -1, d).transpose(1, 2)
    k = self.k_proj(hidden_states).view(b, T, -1, d).transpose(1, 2)
    v = self.v_proj(hidden_states).view(b, T, -1, d).transpose(1, 2)
    cos, sin = position_embeddings
    q_abs = _rope(q, cos, sin)
    k = _rope(k, cos, sin)
    dev = hidden_states.device

    pos_ids = kwargs.get("position_ids")
    if lam is not None:
        layer = lam.layers[li]
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        pos_new = (pos_ids[0].to(dev) if pos_ids is not None
                   else torch.arange(layer.seen, layer.seen + T, device=dev))
        if lam.accllm_hook is not None:
            if getattr(lam.accllm_hook, "needs_rope", False):
                k, v = lam.accllm_hook(li, k, v, rope=(cos, sin))
            else:
                k, v = lam.accllm_hook(li, k, v)
        if layer.pos is None:
            K, V, P = k, v, pos_new
        else:
            K = torch.cat([layer.k, k], dim=2)
            V = torch.cat([layer.v, v], dim=2)
            P = torch.cat([layer.pos, pos_new])
        S, W = lam.sinks, lam.window
    else:
        K, V = cache.update(k, v, li)   # full attention (a hooked DynamicCache applies its hook here)
        n = K.shape[2]
        first = int(pos_ids[0, 0]) - (n - T) if pos_ids is not None else 0
        P = torch.arange(first, first + n, device=dev)
        pos_new = P[n - T:]
        S, W = None, None

    qi = pos_new[:, None]
    vis = P[None, :] <= qi
    if W is not None:
        vis &= (P[None, :] < S) | (P[None, :] > qi - W)
    base_vis = vis
    nrep = self.num_key_value_groups
    Kr, Vr = _repeat_kv(K, nrep), _repeat_kv(V, nrep)
    scores = torch.matmul(q_abs, Kr.transpose(2, 3)) * self.scaling          # [b, h, T, n]
    if lam is not None and lam.rope_mode == "cache" and S > 0:
        cpos = torch.clamp(pos_new, max=S + W - 1)
        if bool((cpos != pos_new).any()):
            sink_cols = (P < S).nonzero().flatten()
            if sink_cols.numel():
                cos_c, sin_c = lam.rotary(hidden_states, cpos[None])
                q_c = _rope(q, cos_c, sin_c)
                scores[..., sink_cols] = torch.matmul(q_c, Kr[:, :, sink_cols].transpose(2, 3)) * self.scaling
    head_alive = None
    if sp is not None:
        st = sp.state_for(cache, dev)
        vis = vis & st.token_alive(li, P)[None, :]
        head_alive = st.head_alive(li)
    scores = scores.masked_fill(~vis[None, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if head_alive is not None:
        probs = probs * head_alive.to(probs.dtype)[None, :, None, None]
    out = torch.matmul(probs, Vr)                                              # [b, h, T, d]
    if sp is not None:
        st.observe(li, P, probs, out, vis, base_vis, head_alive, nrep)
    out = out.transpose(1, 2).reshape(b, T, -1).contiguous()
    out = self.o_proj(out)

    if lam is not None:          # keep sinks + the last W tokens
        last = int(pos_new[-1])
        keep = (P < S) | (P > last - W)
        layer.k, layer.v, layer.pos = K[:, :, keep], V[:, :, keep], P[keep]
        layer.seen = last + 1
        if li == len(lam.layers) - 1:
            lam.peak_tokens = max(lam.peak_tokens, layer.stored())
    if sp is not None and li == self.config.num_hidden_layers - 1:
        st.decide(P if lam is None else lam.layers[li].pos, int(pos_new[-1]))
    return out, None


def patch_attention(model) -> int:
    """Route every decoder layer's attention through accllm's kernel (idempotent). Returns the count."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise AccllmError(f"accllm attention needs a Llama-family causal LM (model.model.layers); got "
                          f"{type(model).__name__}")
    count = 0
    for layer in layers:
        attn = layer.self_attn
        if not hasattr(attn, "_accllm_orig_forward"):
            attn._accllm_orig_forward = attn.forward
            attn.forward = types.MethodType(_accllm_attention_forward, attn)
        count += 1
    return count


def unpatch_attention(model) -> int:
    """Undo :func:`patch_attention` (the layers' own forward again); returns how many layers were
    patched. A patched model cannot be pickled (its forward is bound to a function of this module), so
    a saved build step unpatches, saves and patches again."""
    count = 0
    for layer in getattr(getattr(model, "model", None), "layers", None) or []:
        attn = layer.self_attn
        if hasattr(attn, "_accllm_orig_forward"):
            del attn.forward                       # the instance attribute patch_attention set
            del attn._accllm_orig_forward
            count += 1
    return count


def make_cache_factory(model, recipe, kv_hook=None):
    """Per-session KV cache factory for *recipe*: ``factory(config) -> transformers Cache``.

    full   → :class:`HookedDynamicCache` (applies *kv_hook* on writes; stock attention kernels)
    lambda → :class:`LambdaCache` (S sinks + W window, banded mask, rope_mode) and the model's
             attention is routed through accllm's kernel (:func:`patch_attention`).
    """
    check_recipe(recipe)
    if kv_hook is not None and not callable(kv_hook):
        raise AccllmError(f"kv_hook must be callable hook(layer_idx, k, v) -> (k, v), got {type(kv_hook).__name__}")
    if recipe.attention == "full":
        rotary = model.model.rotary_emb
        return lambda config: HookedDynamicCache(config, hook=kv_hook, rotary=rotary)
    patch_attention(model)
    rotary = model.model.rotary_emb
    S, W, mode = recipe.sink_tokens, recipe.window, recipe.rope_mode
    return lambda config: LambdaCache(config, S, W, mode, hook=kv_hook, rotary=rotary)


# --------------------------------------------------------------------------------------------
# generation (greedy) through any cache factory; runs far past the trained context under Λ
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, cache_factory=None, block: int = 1024):
    """Greedy decoding with absolute position ids; the prompt is prefilled in *block*-token blocks.
    Returns (new token ids LongTensor [max_new_tokens], the session's cache)."""
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise AccllmError("generate: prompt_ids must be a non-empty 1-D LongTensor")
    if max_new_tokens < 0:
        raise AccllmError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    cache = cache_factory(model.config) if cache_factory else DynamicCache(config=model.config)
    pos = 0
    logits = None
    for s in range(0, prompt_ids.numel(), block):
        ids = prompt_ids[s:s + block]
        out = model(input_ids=ids[None], cache=cache, use_cache=True, logits_to_keep=1,
                    position_ids=torch.arange(pos, pos + ids.numel())[None])
        cache, pos, logits = out.cache, pos + ids.numel(), out.logits[0, -1]
    new = []
    for _ in range(max_new_tokens):
        nxt = int(torch.argmax(logits))
        new.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True,
                    position_ids=torch.tensor([[pos]]))
        cache, pos, logits = out.cache, pos + 1, out.logits[0, -1]
    return torch.tensor(new, dtype=torch.long), cache
