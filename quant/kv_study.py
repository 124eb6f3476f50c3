"""Where the 4-bit KV cache loses perplexity: swap the key/value quantizer of the kv4 hook and measure.

    .venv/bin/python -m quant.kv_study --chunks 4 --variants none,kv4,keys,values,ktok32,normtok16,hadtok32

Calibrates the ``kv4`` recipe once, in the accelerator's key format unless ``--set`` says otherwise
(static per-channel key constants after RoPE, on WikiText-2 valid), then for
each variant replaces ``KVQuantHook.quant_keys`` / ``quant_values`` and evaluates the one perplexity
harness on WikiText-2 test (ctx 1024 x --chunks). Fake quantization only: these are candidate formats,
not what the accelerator implements (static per-channel keys after RoPE, docs/numerics.md). Variants:

  none       no KV quantization (the reference)        kv4        the recipe as it is
  keys       keys quantized, values float              values     values quantized, keys float
  vgG        values per token in groups of G channels (keys as kv4)
  ktokG      keys per token, asymmetric, groups of G channels
  hadtokG    keys rotated by a normalised Hadamard matrix per head, then per token in groups of G
  tokscale   keys: static per-channel centre and range + one dynamic scale per key (= kv_key_token_scale)
  normtokG   keys: normalised by kv4's static per-channel centre and range, then per token in groups of G
  onlylayerI kv4's keys in layer I only (values float)

With ``--set kv_key_rope=pre`` every key variant acts on the keys before RoPE (the hook un-rotates
them, calls the variant, rotates back), with constants calibrated before RoPE.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _hadamard(n: int):
    import torch
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != n:
        raise ValueError(f"head_dim {n} is not a power of two")
    return h / n ** 0.5


def variant_hooks(hook, name: str):
    """(quant_keys, quant_values) of variant *name* on a calibrated kv4 *hook*."""
    from .quantizers import asym_dynamic_fake_quant
    qk, qv = hook.quant_keys, hook.quant_values
    bits = hook.bits
    ident_k, ident_v = (lambda i, k: k), (lambda v: v)

    def centre_range(i):
        s, z = hook.k_scale[i], hook.k_zero[i]
        lo, hi = -z * s, ((1 << bits) - 1 - z) * s
        return ((hi + lo) / 2)[None, :, None, :], ((hi - lo) / 2)[None, :, None, :]

    def num(prefix):
        return int(name[len(prefix):])

    if name == "none":
        return ident_k, ident_v
    if name == "kv4":
        return qk, qv
    if name == "keys":
        return qk, ident_v
    if name == "values":
        return ident_k, qv
    if name.startswith("vg"):
        return qk, (lambda v, g=num("vg"): asym_dynamic_fake_quant(v, bits, g))
    if name.startswith("ktok"):
        return (lambda i, k, g=num("ktok"): asym_dynamic_fake_quant(k, bits, g)), qv
    if name.startswith("hadtok"):
        def f(i, k, g=num("hadtok")):
            h = _hadamard(k.shape[-1])
            return (asym_dynamic_fake_quant(k.float() @ h.T, bits, g) @ h).to(k.dtype)
        return f, qv
    if name == "tokscale":                      # = recipe key kv_key_token_scale (quant/kv.py)
        return (lambda i, k: hook._token_scaled(k, hook.k_scale[i][None, :, None, :],
                                                hook.k_zero[i][None, :, None, :])), qv
    if name.startswith("normtok"):
        def f(i, k, g=num("normtok")):
            m, r = centre_range(i)
            return (m + r * asym_dynamic_fake_quant((k.float() - m) / r, bits, g)).to(k.dtype)
        return f, qv
    if name.startswith("onlylayer"):
        return (lambda i, k, li=num("onlylayer"): qk(i, k) if i == li else k), ident_v
    raise ValueError(f"unknown variant {name!r} (see python -m quant.kv_study --help)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quant.kv_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--variants", default="none,kv4,keys,values")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe overrides of the kv4 recipe (e.g. kv_group_size=32)")
    args = p.parse_args(argv)
    import torch
    from algo.common import AccllmError
    from algo.data import load_tokens
    from algo.eval import perplexity_chunks
    from algo.models import load_model
    from algo.recipe import load_recipe
    from .pipeline import prepare
    try:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        loaded = load_model(args.model)
        tokens = load_tokens("wikitext2", loaded.tokenizer, args.ctx * args.chunks)
        # the accelerator's key format unless overridden: static per-channel constants after RoPE
        base = ["kv_key_rope=post", "kv_key_token_scale=false"]
        prepared = prepare(loaded, load_recipe("kv4", None, base + args.sets), progress=False)
        hook = loaded.model.accllm_kv_hook
        hooks = {n: variant_hooks(hook, n) for n in names}     # unknown names fail before any evaluation
    except (AccllmError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {}
    for n in names:
        hook.quant_keys, hook.quant_values = hooks[n]
        t = time.time()
        res[n] = round(perplexity_chunks(prepared.scorer(), tokens, args.ctx, args.chunks, progress=False)["ppl"], 3)
        ref = res.get("none")
        print(f"{n:12s} ppl {res[n]:9.3f}" + (f"  {res[n] / ref - 1:+.1%} vs none" if ref else "")
              + f"  ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
