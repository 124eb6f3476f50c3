"""``accllm eval``: the perplexity harness from the command line."""
from __future__ import annotations

import json
import sys
import time

from .args import RECIPE_EPILOG, add_model_args, add_progress_args, add_recipe_args, recipe_from_args

DESCRIPTION = """Perplexity of a model under a recipe, on WikiText-2 test or any UTF-8 text file.

chunks mode (default): --chunks independent windows of --ctx tokens.
stream mode (--stream): one --length-token sequence fed through the KV cache in --block-token blocks,
reporting per-block perplexity; the mode in which Λ-shaped attention is judged."""
EPILOG = RECIPE_EPILOG


def add_arguments(p) -> None:
    add_model_args(p)
    add_recipe_args(p)
    p.add_argument("--package", default=None, metavar="DIR",
                   help="evaluate a compiled package (from compile-model) instead of --model/--recipe; "
                        "its sha256s are verified first, a tampered package is refused")
    p.add_argument("--backend", default=None, choices=("emu", "rtl", "xrt"),
                   help="with --package: score through a device (the compiled program on the functional "
                        "model, the RTL simulation or a card) instead of the torch fake-quant model")
    p.add_argument("--data", default="wikitext2", help="wikitext2 (test split) or a path to a UTF-8 text file")
    p.add_argument("--ctx", type=int, default=1024, help="tokens per chunk (default %(default)s)")
    p.add_argument("--chunks", type=int, default=16, help="number of chunks (default %(default)s)")
    p.add_argument("--stream", action="store_true", help="streaming mode over one long sequence")
    p.add_argument("--length", type=int, default=16384, help="stream mode: tokens in the sequence")
    p.add_argument("--block", type=int, default=1024, help="stream mode: tokens per block")
    p.add_argument("--plot", default=None, metavar="PNG", help="stream mode: write a per-block perplexity plot")
    add_progress_args(p)


def _plot_blocks(result: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from algo.common import atomic_write_bytes
    import io
    xs = [b["end"] for b in result["blocks"]]
    ys = [b["ppl"] for b in result["blocks"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, ys, marker="o")
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(f"perplexity of the last {result['block']} tokens")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _package_tokenizer(pkg):
    """The tokenizer a package carries (older packages: their source model's)."""
    from host.runtime import tokenizer_for
    return tokenizer_for(pkg.dir, pkg.manifest)


def run(args) -> int:
    from algo.data import load_tokens
    from algo.eval import format_table, perplexity_chunks, perplexity_stream
    from algo.models import load_model
    from quant.pipeline import prepare

    import contextlib
    from algo.common import AccllmError
    stack = contextlib.ExitStack()                 # holds the device runtime of --backend, if any
    progress = not args.no_progress
    t0 = time.time()
    need = args.length if args.stream else args.ctx * args.chunks
    if getattr(args, "package", None):
        from quant.package import load_package
        from algo.eval import HFScorer
        pkg = load_package(args.package)               # verifies format, version and every sha256
        recipe = pkg.recipe
        tokens = load_tokens(args.data, _package_tokenizer(pkg), need)
        if getattr(args, "backend", None):         # the same harness through a device (host/runtime.py)
            from host.runtime import DeviceScorer, open_runtime
            rt = stack.enter_context(open_runtime(args.package, args.backend, owner="accllm eval"))
            scorer = DeviceScorer(rt, name=f"{args.backend}:{recipe.name}")
        else:
            model = pkg.to_torch_model()
            scorer = HFScorer(model, cache_factory=pkg.cache_factory(model), name=f"package:{recipe.name}")
        args.model = f"package {args.package} ({pkg.manifest['source']['spec']})"
    else:
        if getattr(args, "backend", None):
            raise AccllmError("--backend needs --package DIR (a package compiled with compile-model --hw ...)")
        recipe = recipe_from_args(args)            # validate before any work
        loaded = load_model(args.model)
        tokens = load_tokens(args.data, loaded.tokenizer, need)
        prepared = prepare(loaded, recipe, progress=progress)
        scorer = prepared.scorer()
    with stack:
        if args.stream:
            res = perplexity_stream(scorer, tokens, args.length, args.block, progress=progress)
        else:
            res = perplexity_chunks(scorer, tokens, args.ctx, args.chunks, progress=progress)
    res.update(model=args.model, recipe=recipe.to_dict(), data=args.data, wall_seconds=time.time() - t0)
    if args.plot and args.stream:
        _plot_blocks(res, args.plot, f"{args.model}, recipe {recipe.name}")
        res["plot"] = args.plot
    if args.json:
        print(json.dumps(res))
        return 0
    rows = [("model", args.model), ("recipe", f"{recipe.name}: {recipe.summary()}"), ("data", args.data)]
    if args.stream:
        rows += [("length / block", f"{args.length} / {args.block} tokens")]
        rows += [(f"block {b['start']}-{b['end']}", f"{b['ppl']:.3f}") for b in res["blocks"]]
    else:
        rows += [("ctx x chunks", f"{args.ctx} x {args.chunks}")]
    rows += [("perplexity", f"{res['ppl']:.3f}"), ("time", f"{res['wall_seconds']:.1f} s")]
    print(format_table(rows))
    return 0
