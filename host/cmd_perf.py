"""``accllm perf``: cycle-model projection of decode/prefill speed and the HBM roofline."""
from __future__ import annotations


from .args import add_recipe_args, recipe_from_args

DESCRIPTION = """Project bytes moved per token, cycles per layer, decode and prefill tokens/s, time to
first token and the HBM roofline (peak bandwidth / bytes per token) for a model shape on a hardware
configuration, from the cycle model (sim/cycle.py). Model dimensions only — no weights are loaded.
Two models: the target architecture (sim/cycle.CycleModel; prefetch and attention/SFU on the MAC
lanes, which the RTL does not have yet: a projection, not validated) and the RTL as built
(RtlCycleModel: within 1 % of the cycles the RTL simulation measures on tiny and SmolLM2-135M,
`accllm bench rtl`)."""
EPILOG = ("examples:\n  accllm perf --model llama2-7b --hw u280 --recipe accllm --json\n"
          "  accllm perf --package build/llama2-7b-shape --json\n"
          "  accllm perf --model smollm2-135m --hw u280 --plot roofline.png")


def add_arguments(p) -> None:
    p.add_argument("--model", default="llama2-7b", help="llama2-7b | smollm2-135m | tiny | HF directory (config.json)")
    p.add_argument("--package", default=None, metavar="DIR",
                   help="a compiled package: its model dimensions, recipe and (when compiled for one) hardware "
                        "configuration, instead of --model / --recipe / --hw (only its manifest is read)")
    p.add_argument("--hw", default=None, help="hardware configuration preset (u280 | sim-small; default u280, or "
                   "the package's)")
    p.add_argument("--hw-set", dest="hw_sets", action="append", default=[], metavar="KEY=VALUE")
    add_recipe_args(p, default="accllm")
    p.add_argument("--context", type=int, default=None,
                   help="KV tokens present when decoding (default: S+W under Λ, else the configured context)")
    p.add_argument("--prompt", type=int, default=512, help="prompt length for prefill speed and TTFT (default 512)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a roofline plot")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bpt = res["bytes_per_token"]
    peak = res["hbm_peak_bytes_per_s"]
    xs = [bpt * f for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([x / 1e9 for x in xs], [peak / x for x in xs], label=f"HBM roofline ({peak / 1e9:.0f} GB/s)")
    ax.scatter([bpt / 1e9], [res["decode_tokens_per_s"]], color="C1", zorder=3,
               label=f"projected {res['decode_tokens_per_s']:.0f} tok/s (unvalidated)")
    for name, tps in (("AccLLM (paper)", 164), ("FlightLLM (paper)", 55)):
        ax.axhline(tps, ls="--", lw=0.8, color="gray")
        ax.text(xs[-1] / 1e9, tps, f" {name} {tps}", va="bottom", ha="right", fontsize=8)
    ax.set_xlabel("bytes per decode token (GB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{res['model']} on {res['hw']} ({res['recipe']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from algo.common import atomic_write_bytes
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def _from_package(args):
    """(shape, recipe, hw name) of --package from its manifest (checked; the weights are not read)."""
    from algo.common import AccllmError
    from algo.recipe import recipe_from_dict
    from quant.package import read_manifest
    if args.recipe_file or args.sets:
        raise AccllmError("--package brings its own recipe: --recipe-file and --set apply to --model only")
    man = read_manifest(args.package)
    mc = man.get("model_config") or {}
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if any(k not in mc for k in need):
        raise AccllmError(f"package {args.package}: manifest.json model_config lacks "
                          f"{', '.join(k for k in need if k not in mc)}")
    shape = dict(hidden_size=mc["hidden_size"], intermediate_size=mc["intermediate_size"],
                 num_hidden_layers=mc["num_hidden_layers"], num_attention_heads=mc["num_attention_heads"],
                 num_key_value_heads=mc.get("num_key_value_heads") or mc["num_attention_heads"],
                 head_dim=mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"],
                 vocab_size=mc["vocab_size"], max_position_embeddings=mc.get("max_position_embeddings", 4096),
                 tie_word_embeddings=bool(mc.get("tie_word_embeddings", False)),
                 rope_theta=(mc.get("rope_parameters") or {}).get("rope_theta", mc.get("rope_theta", 10000.0)),
                 name=(man.get("source") or {}).get("spec") or str(args.package))
    return shape, recipe_from_dict(man["recipe"]), (man.get("hw") or {}).get("name")


def run(args) -> int:
    from algo.models import model_shape
    from hw.config import load_hw
    from sim.cycle import project
    from algo.common import AccllmError
    if args.package:
        shape, recipe, hw_name = _from_package(args)
    else:
        recipe = recipe_from_args(args)
        shape = dict(model_shape(args.model), name=args.model)
        hw_name = None
    hw = load_hw(args.hw or hw_name or "u280", args.hw_sets)
    if args.context is not None and args.context < 0:
        raise AccllmError(f"--context must be >= 0, got {args.context}")
    if args.prompt < 1:
        raise AccllmError(f"--prompt must be >= 1, got {args.prompt}")
    res = project(shape, recipe, hw, args.context, args.prompt)
    if args.plot:
        _plot(res, args.plot)
        res["plot"] = args.plot
    if args.json:
        from host.args import emit_json
        emit_json(args, res, indent=1)
        return 0
    b = res["bytes_per_token_breakdown"]
    rows = [("model / hw / recipe", f"{res['model']} / {res['hw']} @ {res['clock_mhz']:.0f} MHz / {res['recipe']}"),
            ("KV tokens kept", f"{res['context_kept_tokens']}"),
            ("bytes per token", f"{res['bytes_per_token'] / 1e6:,.1f} MB (weights {b['linear_weights'] / 1e6:,.1f}, "
                                f"lm_head {b['lm_head'] / 1e6:,.1f}, KV {(b['kv_read'] + b['kv_write']) / 1e6:,.1f})"),
            ("cycles per layer", f"{res['cycles_per_layer']:,} ({', '.join(f'{k} {v}' for k, v in res['cycles_per_layer_breakdown'].items() if k != 'note')})"),
            ("decode", f"{res['decode_tokens_per_s']:.1f} tokens/s"),
            ("HBM roofline", f"{res['roofline_tokens_per_s']:.1f} tokens/s ({res['hbm_peak_bytes_per_s'] / 1e9:.1f} GB/s); "
                             f"projection at {100 * res['fraction_of_roofline']:.1f}%"),
            ("prefill", f"{res['prefill_tokens_per_s']:.1f} tokens/s; TTFT {res['ttft_s'] * 1e3:.1f} ms for {res['prompt_tokens']} tokens"),
            ("anchors", "AccLLM 164 tokens/s, FlightLLM 55 tokens/s (Llama-2-7B, U280)"),
            ("status", "target-architecture model, NOT validated (prefetch + SFU/attention lanes the RTL lacks)")]
    ab = res.get("as_built")
    if ab:
        rows.append(("RTL as built", f"{ab['decode_tokens_per_s']:.2f} tokens/s ({ab['cycles_per_token']:,} cycles/token; "
                                     f"attention {ab['cycles_per_layer_breakdown']['attention']:,} of "
                                     f"{ab['cycles_per_layer']:,} per layer); model validated on tiny/sim-small"))
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    if args.plot:
        print(f"  {'plot':<{w}}  {args.plot}")
    return 0
