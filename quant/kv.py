"""4-bit (or 8-bit) KV-cache quantization, applied as the cache is written (recipe step 2).

``make_kv_hook(model, recipe, calib, progress)`` returns a :class:`KVQuantHook`;
``hook(layer_idx, key_states, value_states) -> (k, v)`` fake-quantizes what is about to be written
into the cache (shapes [B, kv_heads, T, head_dim]; keys as the cache stores them — after RoPE with
full attention). The attention code (algo.attention.make_cache_factory) calls it on every cache
write, so the model attends to
the quantized cache and perplexity includes the KV error.

* keys, per channel, **static** (default, ``key_mode="static"``): one fp16 scale and one integer
  zero point per (layer, kv head, channel), calibrated on WikiText-2 valid by a per-channel search of
  the clipping range minimising the mean squared error. The accelerator quantizes each key on append
  with constants (no statistics over tokens), which is what the hardware can do one token at a time.
* keys, KIVI-style (``key_mode="group"``, for measurement): per channel, dynamic over groups of
  ``kv_group_size`` consecutive tokens of each write.
* ``key_rope`` (recipe ``kv_key_rope``): ``post`` (default; what the accelerator implements) quantizes
  the keys as stored, after RoPE; ``pre`` quantizes them *before* RoPE (KVQuant-style: the
  per-channel outliers of a key are stable before the rotation and smeared over both channels of a
  pair after it), with constants calibrated on un-rotated keys; the dequantized key is then
  rotated at its position. On the accelerator that means rotating every key as it is read; the
  compiler refuses ``pre`` until the KV-cache unit does (hw/compiler.py).
* ``token_scale`` (recipe ``kv_key_token_scale``): the static per-channel constants give each
  channel a centre and a half-range; each key is normalised by them and then quantized with one
  dynamic fp16 scale of its own (max over its channels), so a token whose key is small everywhere
  still gets all 16 levels (one extra fp16 per key token and KV head; also refused by the compiler).
* values, per token: dynamic asymmetric, one fp16 scale and integer zero per group of
  ``min(kv_group_size, head_dim)`` channels.
"""
from __future__ import annotations

import torch

from algo.attention import _rotate_half
from algo.common import AccllmError

from .quantizers import asym_dynamic_fake_quant, asym_fake_quant, fp16_scale


class KVQuantHook:
    def __init__(self, bits: int, group: int, num_layers: int, key_mode: str = "static", key_rope: str = "post",
                 token_scale: bool = False):
        if key_mode not in ("static", "group"):
            raise AccllmError(f"key_mode {key_mode!r}: accepted static, group")
        if key_rope not in ("post", "pre"):
            raise AccllmError(f"kv_key_rope {key_rope!r}: accepted post, pre")
        self.bits, self.group, self.key_mode = bits, group, key_mode
        self.key_rope = key_rope
        self.token_scale = bool(token_scale)     # static per-channel centre/range + one dynamic scale per key
        self.needs_rope = key_rope == "pre"     # callers then pass rope=(cos, sin) of the written keys
        self.num_layers = num_layers
        self.k_scale: list[torch.Tensor | None] = [None] * num_layers   # [kv_heads, head_dim] fp32 (fp16-exact)
        self.k_zero: list[torch.Tensor | None] = [None] * num_layers

    def _vgroup(self, hd: int) -> int:
        g = min(self.group, hd)
        if hd % g:
            raise AccllmError(f"kv_group_size {self.group} does not divide head_dim {hd}")
        return g

    def quant_keys(self, layer_idx: int, k: torch.Tensor) -> torch.Tensor:
        if self.key_mode == "static":
            s, z = self.k_scale[layer_idx], self.k_zero[layer_idx]
            if s is None:
                raise RuntimeError(f"key quantization constants of layer {layer_idx} not calibrated")
            if self.token_scale:
                return self._token_scaled(k, s[None, :, None, :], z[None, :, None, :])
            return asym_fake_quant(k, s[None, :, None, :], z[None, :, None, :], self.bits)
        # KIVI-style: per channel over groups of tokens of this write
        B, Hh, T, D = k.shape
        G = self.group
        pad = (-T) % G
        kp = torch.nn.functional.pad(k.float(), (0, 0, 0, pad), value=float("nan")) if pad else k.float()
        kg = kp.reshape(B, Hh, (T + pad) // G, G, D).transpose(-1, -2)       # [..., D, G tokens]
        hi = torch.nan_to_num(kg, nan=-float("inf")).amax(-1).clamp(min=0)
        lo = torch.nan_to_num(kg, nan=float("inf")).amin(-1).clamp(max=0)
        qmax = (1 << self.bits) - 1
        s = fp16_scale((hi - lo) / qmax)
        z = torch.clamp(torch.round(-lo / s), 0, qmax)
        q = torch.clamp(torch.round(kg / s[..., None]) + z[..., None], 0, qmax)
        out = (s[..., None] * (q - z[..., None])).transpose(-1, -2).reshape(B, Hh, T + pad, D)
        return out[:, :, :T].to(k.dtype)

    def _token_scaled(self, k: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Keys with ``kv_key_token_scale``: the static per-channel range [lo, hi] of the constants gives
        a centre m and half-range r; each key (one token of one KV head) is normalised u = (k − m) / r
        and quantized symmetrically with its own fp16 scale t = max |u| over its channels:
        code = clamp(round(u / t · h + h), 0, 2h), h = (2^b − 1) / 2; k̂ = m + r · t · (code − h) / h."""
        qmax = (1 << self.bits) - 1
        half = qmax / 2
        lo, hi = -z * s, (qmax - z) * s
        m, r = (hi + lo) / 2, ((hi - lo) / 2).clamp(min=1e-8)
        u = (k.float() - m) / r
        t = fp16_scale(u.abs().amax(-1, keepdim=True).clamp(min=1e-6))
        c = torch.clamp(torch.round(u / t * half + half), 0, qmax)
        return (m + r * t * (c - half) / half).to(k.dtype)

    def quant_values(self, v: torch.Tensor) -> torch.Tensor:
        return asym_dynamic_fake_quant(v, self.bits, self._vgroup(v.shape[-1]))

    def __call__(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, rope=None):
        if self.needs_rope:
            if rope is None:
                raise RuntimeError("kv_key_rope=pre: the cache must pass rope=(cos, sin) of the written keys")
            cos, sin = _rope_4d(rope)
            pre = unrotate(key_states.float(), cos, sin)
            k = rotate(self.quant_keys(layer_idx, pre), cos, sin).to(key_states.dtype)
            return k, self.quant_values(value_states)
        return self.quant_keys(layer_idx, key_states), self.quant_values(value_states)

    def constants(self) -> dict[str, torch.Tensor]:
        """Static constants for the package: ``model.layers.{i}.self_attn.k_scale`` / ``k_zero``
        (fp16 [kv_heads, head_dim])."""
        out = {}
        if self.key_mode != "static":
            return out
        for i, (s, z) in enumerate(zip(self.k_scale, self.k_zero)):
            out[f"model.layers.{i}.self_attn.k_scale"] = s.to(torch.float16)
            out[f"model.layers.{i}.self_attn.k_zero"] = z.to(torch.float16)
        return out

    @classmethod
    def from_constants(cls, bits: int, group: int, num_layers: int, tensors: dict,
                       key_rope: str = "post", token_scale: bool = False) -> "KVQuantHook":
        h = cls(bits, group, num_layers, "static", key_rope, token_scale)
        for i in range(num_layers):
            h.k_scale[i] = tensors[f"model.layers.{i}.self_attn.k_scale"].float()
            h.k_zero[i] = tensors[f"model.layers.{i}.self_attn.k_zero"].float()
        return h


def _rope_4d(rope):
    """(cos, sin) as the model's rotary embedding returns them ([b, T, D]) → broadcastable over heads."""
    cos, sin = rope
    return cos[:, None].float(), sin[:, None].float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (the Llama convention: channel i pairs with i + D/2)."""
    return x * cos + _rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate` (rotation by the opposite angle)."""
    return x * cos - _rotate_half(x) * sin


def _search_channel_range(x: torch.Tensor, bits: int, steps: int = 16):
    """x [N, C] samples per channel → (scale [C], zero [C]) minimising per-channel MSE over a grid
    of (max, min) clip ratios."""
    qmax = (1 << bits) - 1
    hi0 = x.amax(0).clamp(min=0)
    lo0 = x.amin(0).clamp(max=0)
    best_err = torch.full_like(hi0, float("inf"))
    best_s = torch.ones_like(hi0)
    best_z = torch.zeros_like(hi0)
    ratios = torch.linspace(1.0, 0.5, steps)
    for rh in ratios:
        for rl in ratios:
            s = fp16_scale((hi0 * rh - lo0 * rl) / qmax)
            z = torch.clamp(torch.round(-(lo0 * rl) / s), 0, qmax)
            q = torch.clamp(torch.round(x / s) + z, 0, qmax)
            err = ((s * (q - z) - x) ** 2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


class _Recorder:
    """A KV hook that records (a subsample of) the keys written, and changes nothing."""

    def __init__(self, num_layers: int, max_tokens: int, needs_rope: bool = False):
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.max_tokens = max_tokens
        self.needs_rope = needs_rope         # record the keys before RoPE (kv_key_rope=pre)

    def __call__(self, layer_idx, k, v, rope=None):
        seen = unrotate(k.float(), *_rope_4d(rope)) if self.needs_rope else k
        have = sum(t.shape[1] for t in self.keys[layer_idx])
        if have < self.max_tokens:
            # [B, H, T, D] -> [H, B*T, D]
            self.keys[layer_idx].append(seen.detach().float().permute(1, 0, 2, 3).reshape(k.shape[1], -1, k.shape[3]))
        return k, v                          # the cache gets what it was given


@torch.no_grad()
def make_kv_hook(model, recipe, calib: torch.Tensor | None, progress: bool = True,
                 key_mode: str = "static", max_tokens: int = 8192) -> KVQuantHook:
    """Calibrate the static key constants on *calib* (WikiText-2 valid windows) and return the hook."""
    from tqdm.auto import tqdm
    L = model.config.num_hidden_layers
    hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    hook = KVQuantHook(recipe.kv_bits, recipe.kv_group_size, L, key_mode, recipe.kv_key_rope,
                       recipe.kv_key_token_scale)
    hook._vgroup(hd)
    model.accllm_kv_hook = hook          # the package writer exports its constants from here
    if key_mode != "static":
        return hook
    if calib is None:
        raise AccllmError("static key quantization needs calibration data (WikiText-2 valid)")
    rec = _Recorder(L, max_tokens, hook.needs_rope)
    from algo.attention import make_cache_factory
    factory = make_cache_factory(model, recipe, rec)
    n = calib.shape[0]
    bar = tqdm(total=n, desc="kv calibrate", disable=not progress, leave=False)
    for i in range(n):
        if all(sum(t.shape[1] for t in ks) >= max_tokens for ks in rec.keys):
            break
        cache = factory(model.config)
        model(input_ids=calib[i:i + 1], cache=cache, use_cache=True)
        bar.update(1)
    bar.close()
    for li in range(L):
        if not rec.keys[li]:
            raise AccllmError(f"no keys of layer {li} were written during KV calibration")
        ks = torch.cat(rec.keys[li], dim=1)                        # [H, T, D]
        H, T, D = ks.shape
        s, z = _search_channel_range(ks.permute(1, 0, 2).reshape(T, H * D), recipe.kv_bits)
        hook.k_scale[li] = s.reshape(H, D)
        hook.k_zero[li] = z.reshape(H, D)
    return hook


class LayerKVCalibrator:
    """The static key constants of :func:`make_kv_hook`, one decoder block at a time (the block-streamed
    build): the calibration windows :func:`make_kv_hook` would run (each on its own, with a fresh cache of
    the recipe's kind) are carried from block to block as hidden states; :meth:`layer` runs block *li* on
    them with a fresh cache, records the keys it writes and sets that block's constants. The keys, and so
    the constants, are those of the whole-model calibration."""

    def __init__(self, model, recipe, calib: torch.Tensor | None, max_tokens: int = 8192):
        L = model.config.num_hidden_layers
        hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        self.model, self.recipe = model, recipe
        self.hook = KVQuantHook(recipe.kv_bits, recipe.kv_group_size, L, "static", recipe.kv_key_rope,
                                recipe.kv_key_token_scale)
        self.hook._vgroup(hd)
        model.accllm_kv_hook = self.hook
        if calib is None:
            raise AccllmError("static key quantization needs calibration data (WikiText-2 valid)")
        self.calib, self.max_tokens = calib, max_tokens
        self.rec = _Recorder(L, max_tokens, self.hook.needs_rope)
        from algo.attention import make_cache_factory
        self.factory = make_cache_factory(model, recipe, self.rec)
        self.calls = None                 # per window: (hidden states entering the next block, its kwargs)

    def start(self) -> None:
        from algo.calib import capture_layer0_calls
        T = int(self.calib.shape[1])
        n = min(int(self.calib.shape[0]), -(-self.max_tokens // T))    # the windows make_kv_hook runs
        self.calls = capture_layer0_calls(self.model, [self.calib[i:i + 1] for i in range(n)],
                                          lambda: self.factory(self.model.config))

    def state(self) -> dict:
        return {"calls": [(h, {k: v for k, v in kw.items() if k != "cache"}) for h, kw in self.calls],
                "k_scale": list(self.hook.k_scale), "k_zero": list(self.hook.k_zero)}

    def set_state(self, st: dict) -> None:
        self.calls = [(h, {**kw, "cache": None}) for h, kw in st["calls"]]
        self.hook.k_scale, self.hook.k_zero = list(st["k_scale"]), list(st["k_zero"])

    @torch.no_grad()
    def layer(self, li: int) -> None:
        layer = self.model.model.layers[li]
        outs = []
        for h, kw in self.calls:
            o = layer(h, **{**kw, "cache": self.factory(self.model.config)})
            outs.append(o[0] if isinstance(o, tuple) else o)
        self.calls = [(o, kw) for o, (_, kw) in zip(outs, self.calls)]
        if not self.rec.keys[li]:
            raise AccllmError(f"no keys of layer {li} were written during KV calibration")
        ks = torch.cat(self.rec.keys[li], dim=1)                        # [H, T, D]
        self.rec.keys[li] = []
        H, T, D = ks.shape
        s, z = _search_channel_range(ks.permute(1, 0, 2).reshape(T, H * D), self.recipe.kv_bits)
        self.hook.k_scale[li] = s.reshape(H, D)
        self.hook.k_zero[li] = z.reshape(H, D)
