"""``accllm eval``: the perplexity harness from the command line."""
from __future__ import annotations

import sys
import time

from .args import RECIPE_EPILOG, add_model_args, add_progress_args, add_recipe_args, recipe_from_args

DESCRIPTION = """Perplexity of a model under a recipe, on one or several evaluation texts.

chunks mode (default): --chunks independent windows of --ctx tokens.
stream mode (--stream): one --length-token sequence fed through the KV cache in --block-token blocks,
reporting per-block perplexity; the mode in which Λ-shaped attention is judged.

evaluation data (--data, repeatable; the model or package is loaded once and each source scored):
  wikitext2   WikiText-2 test (Wikipedia prose), from $ACCLLM_DATA or ../shared/data/wikitext-2
  pydoc       technical documentation: the CPython reference-manual topics of pydoc_data (half the keys)
  pycode      source code: 24 pure-Python standard-library modules, each after a "# file:" line
  PATH        any UTF-8 text file
pydoc and pycode are built from the running Python (nothing is downloaded), so they depend on its
version, which the output reports. pydoc-calib, pycode-calib and wikitext2-valid are the
calibration parts, disjoint from the evaluation texts. A source shorter than --ctx x --chunks
(stream: --length) tokens is refused before any model work.

task accuracy (--tasks NAME[,NAME], instead of perplexity): lm-evaluation-harness runs local tasks
(nothing is downloaded) through the same scorer as the perplexities, so the recipe's Λ cache,
SpAtten, the fake-quant package or --backend all apply:
  capitals     4-way multiple choice, "What is the capital of X?" (48 countries)
  antonyms     4-way multiple choice, "The opposite of X is" (40 words)
  pydoc_cloze  last-word prediction (LAMBADA-style) on 120 sentences of the pydoc evaluation text
  local        all of them
--limit N scores the first N documents of each task. --json: {"model", "recipe", "tasks": {NAME:
{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr" (multiple choice), "n"}}, "requests",
"wall_seconds"}.

--json prints one JSON object. With one --data: the keys mode, ppl, ctx, chunks, tokens_scored,
chunk_ppl, seconds, model, recipe, data, wall_seconds (stream mode: length, block, blocks, kv
instead of ctx, chunks, chunk_ppl), and data_python (e.g. "CPython 3.11.7") for pydoc/pycode.
With several: {"model", "recipe", "wall_seconds", "results": [...]}, one entry per --data in the
order given, each with the single-source keys other than model, recipe and wall_seconds; there is
no top-level "ppl"."""
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
    p.add_argument("--data", action="append", default=None, metavar="SOURCE",
                   help="wikitext2 | pydoc | pycode | PATH to a UTF-8 text file; repeatable, each source "
                        "scored in the same run (default wikitext2)")
    p.add_argument("--tasks", default=None, metavar="NAME[,NAME]",
                   help="task accuracy instead of perplexity: local | capitals | antonyms | pydoc_cloze "
                        "(lm-evaluation-harness, local data; see above)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="with --tasks: score the first N documents of each task")
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


def _data_label(data: str) -> str:
    from algo.data import is_built, python_version
    return f"{data} (built from {python_version()})" if is_built(data) else data


def _check_sources(sources: list[str], args) -> None:
    from algo.common import AccllmError
    from algo.data import data_path
    seen = set()
    for d in sources:
        if d in seen:
            raise AccllmError(f"--data {d} is given twice")
        seen.add(d)
    if args.plot and args.stream and len(sources) > 1:
        raise AccllmError(f"--plot takes one --data; {len(sources)} were given ({', '.join(sources)})")
    for d in sources:
        data_path(d)                                # unknown names / missing files: refused before any work


def _load_all(sources: list[str], tokenizer, args) -> dict:
    """Tokens of every source, each checked to be long enough for what was asked."""
    from algo.common import AccllmError
    from algo.data import load_tokens
    need = args.length if args.stream else args.ctx * args.chunks
    asked = f"--length {args.length}" if args.stream else f"--ctx {args.ctx} x --chunks {args.chunks} = {need}"
    out = {}
    for d in sources:
        toks = load_tokens(d, tokenizer, need)
        if toks.numel() < need:
            raise AccllmError(f"--data {d} has {toks.numel()} tokens, fewer than the {asked} asked")
        out[d] = toks
    return out


def _score(scorer, tokens, args, progress: bool) -> dict:
    from algo.eval import perplexity_chunks, perplexity_stream
    if args.stream:
        return perplexity_stream(scorer, tokens, args.length, args.block, progress=progress)
    return perplexity_chunks(scorer, tokens, args.ctx, args.chunks, progress=progress)


def run(args) -> int:
    from algo.data import is_built, python_version
    from algo.eval import format_table
    from algo.models import load_model
    from quant.pipeline import prepare

    import contextlib
    from algo.common import AccllmError
    stack = contextlib.ExitStack()                 # holds the device runtime of --backend, if any
    progress = not args.no_progress
    t0 = time.time()
    tasks = None
    limit = getattr(args, "limit", None)            # callers that build their own namespace (sweep) omit both
    if getattr(args, "tasks", None) is not None:
        from algo.tasks import parse_tasks
        tasks = parse_tasks(args.tasks)          # unknown names: refused before any model work
        if args.data:
            raise AccllmError("--tasks and --data are separate runs: give one of them")
        if args.stream or args.plot:
            raise AccllmError("--stream and --plot are perplexity options; --tasks reports accuracy")
        if limit is not None and limit < 1:
            raise AccllmError(f"--limit takes a positive number of documents, got {limit}")
    elif limit is not None:
        raise AccllmError("--limit applies to --tasks only")
    sources = [] if tasks else list(args.data or ["wikitext2"])
    if getattr(args, "package", None):
        from quant.package import load_package
        from algo.eval import HFScorer
        pkg = load_package(args.package)               # verifies format, version and every sha256
        recipe = pkg.recipe
        _check_sources(sources, args)
        tokenizer = _package_tokenizer(pkg)
        tokens = _load_all(sources, tokenizer, args)
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
        _check_sources(sources, args)
        loaded = load_model(args.model)
        tokenizer = loaded.tokenizer
        tokens = _load_all(sources, tokenizer, args)
        prepared = prepare(loaded, recipe, progress=progress)
        scorer = prepared.scorer()
    if tasks:
        with stack:
            return _run_tasks(scorer, tokenizer, tasks, recipe, args, t0, progress)
    results = []
    with stack:
        for d in sources:
            res = _score(scorer, tokens[d], args, progress)
            res["data"] = d
            if is_built(d):
                res["data_python"] = python_version()
            results.append(res)
    wall = time.time() - t0
    if len(sources) == 1:
        return _report_one(results[0], recipe, args, wall)
    doc = {"model": args.model, "recipe": recipe.to_dict(), "wall_seconds": wall, "results": results}
    if args.json:
        from host.args import emit_json
        emit_json(args, doc)
        return 0
    rows = [("model", args.model), ("recipe", f"{recipe.name}: {recipe.summary()}")]
    if args.stream:
        rows += [("length / block", f"{args.length} / {args.block} tokens")]
    else:
        rows += [("ctx x chunks", f"{args.ctx} x {args.chunks}")]
    if any(is_built(d) for d in sources):
        rows += [("python", f"{python_version()} (pydoc and pycode are built from it)")]
    rows += [("data", f"{'perplexity':>12}  {'tokens scored':>13}  {'seconds':>8}")]
    rows += [(r["data"], f"{r['ppl']:>12.3f}  {r['tokens_scored']:>13d}  {r['seconds']:>8.1f}") for r in results]
    rows += [("time", f"{wall:.1f} s")]
    print(format_table(rows))
    return 0


def _run_tasks(scorer, tokenizer, tasks, recipe, args, t0: float, progress: bool) -> int:
    from algo.eval import format_table
    from algo.tasks import evaluate_tasks
    from algo.common import stdout_to_stderr
    with stdout_to_stderr():                       # lm-eval's own prints must not reach stdout
        res = evaluate_tasks(scorer, tokenizer, tasks, limit=args.limit, progress=progress)
    doc = {"model": args.model, "recipe": recipe.to_dict(), "tasks": res, "limit": args.limit,
           "wall_seconds": time.time() - t0}
    if args.json:
        from host.args import emit_json
        emit_json(args, doc)
        return 0
    rows = [("model", args.model), ("recipe", f"{recipe.name}: {recipe.summary()}")]
    if args.limit:
        rows += [("limit", f"first {args.limit} documents per task")]
    rows += [("task", f"{'acc':>7}  {'± stderr':>8}  {'acc_norm':>8}  {'n':>5}")]
    for n, r in res.items():
        se = f"{r['acc_stderr']:.3f}" if r.get("acc_stderr") is not None else "-"
        an = f"{r['acc_norm']:.3f}" if "acc_norm" in r else "-"
        rows += [(n, f"{r['acc']:>7.3f}  {se:>8}  {an:>8}  {r['n'] or 0:>5}")]
    rows += [("time", f"{doc['wall_seconds']:.1f} s")]
    print(format_table(rows))
    return 0


def _report_one(res: dict, recipe, args, wall: float) -> int:
    from algo.eval import format_table
    data, built = res.pop("data"), res.pop("data_python", None)     # today's key order, then data_python
    res.update(model=args.model, recipe=recipe.to_dict(), data=data, wall_seconds=wall)
    if built:
        res["data_python"] = built
    if args.plot and args.stream:
        _plot_blocks(res, args.plot, f"{args.model}, recipe {recipe.name}")
        res["plot"] = args.plot
    if args.json:
        from host.args import emit_json
        emit_json(args, res)
        return 0
    rows = [("model", args.model), ("recipe", f"{recipe.name}: {recipe.summary()}"), ("data", _data_label(res["data"]))]
    if args.stream:
        rows += [("length / block", f"{args.length} / {args.block} tokens")]
        rows += [(f"block {b['start']}-{b['end']}", f"{b['ppl']:.3f}") for b in res["blocks"]]
    else:
        rows += [("ctx x chunks", f"{args.ctx} x {args.chunks}")]
    rows += [("perplexity", f"{res['ppl']:.3f}"), ("time", f"{res['wall_seconds']:.1f} s")]
    print(format_table(rows))
    return 0
