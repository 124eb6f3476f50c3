"""``accllm sweep``: a design-space sweep over recipe keys and hardware configurations (host/sweep.py)."""
from __future__ import annotations

import os
import sys
import time

from .args import add_model_args, add_progress_args, add_recipe_args

DESCRIPTION = """Sweep a grid of recipe keys and hardware configurations. Every point (the product of the
axes) is compiled into a package for its hardware configuration (as compile-model --hw), projected by
the cycle model (as accllm perf: bytes per token, decode and prefill tokens/s) and scored for
perplexity through its package (as accllm eval --package; WikiText-2 by default, --ctx x --chunks
tokens). Bits per weight come from the package, FPGA resources from a cached synthesis or the
committed report of an unmodified preset (null when neither exists: accllm build-rtl --synth).

grid keys (--grid KEY=V1,V2,... repeatable, or a TOML --grid-file):
  a recipe key          weight_bits, window, sink_tokens, group_size, ... (see accllm compile --help)
  hw.KEY                a hardware configuration key: hw.clock_mhz, hw.weight_ports, hw.max_context, ...
  recipe                named recipes (the base of a point's recipe instead of --recipe)
  hw                    hardware presets (instead of --hw)
A point's recipe: its named recipe, then --recipe-file, then --set, then its grid keys; its hardware
configuration: its preset, then --hw-set, then its hw.KEY keys. Every key and value is checked before
any work; a bad one is refused in one line (exit 2). A combination that only fails when compiled
(e.g. sink_tokens + window above hw.max_context) is a failed point: reported with its error, the
others go on.

--grid-file: TOML, one array of values per key, at the top level or under [grid]; hardware keys as
"hw.clock_mhz" = [...] or in a [hw] table; the values keep their TOML types (a list-valued recipe key
such as prune_skip takes a list per point: prune_skip = [["lm_head"], []]).

Packages are cached by content (the model's weights, the whole recipe, the whole hardware
configuration and the accllm sources) under $XDG_CACHE_HOME/accllm/sweep (or $ACCLLM_CACHE/sweep),
each compiled in a temporary directory and renamed into place, so a point is never compiled twice
(two sweeps making the same package take turns); "compiled" says whether a point compiled its package.

Execution: a local Ray with --workers CPUs (default: this machine's cores) started and stopped by the
command, one point per task; --address ADDR joins a running cluster instead (ray start --head; its
workers need accllm and share the cache folder and data); --local runs the points one after another
in this process without Ray.

Output: a table on stdout, or with --json one document {"points": [...], ...}: per point its grid
settings, recipe, hw, then bits_per_weight (decoder blocks; _linear with lm_head, _total with
embeddings), bytes_per_token, decode_tokens_per_s, prefill_tokens_per_s, ttft_s,
roofline_tokens_per_s, cycles_per_token, rtl_decode_tokens_per_s (the RTL as built), ppl (the first
--data), ppl_by_data, resources, package, compiled, pareto and seconds; a failed point has its
settings, recipe, hw and "error". --out DIR writes results.json (the same document), results.csv and
pareto.png (perplexity vs projected decode tokens/s, the Pareto front highlighted).

exit status: 0 when at least one point succeeded, 1 when every point failed, 2 for a bad option, key
or value (nothing run)."""
EPILOG = ("examples:\n"
          "  accllm sweep --model tiny --hw sim-small --grid weight_bits=2,4 --grid window=8,16 --out sweep\n"
          "  accllm sweep --model tiny --hw sim-small --grid weight_bits=2,4 --grid window=8,16 --local --json\n"
          "  accllm sweep --model smollm2-135m --grid hw=u280,sim-small --grid hw.clock_mhz=200,300 --address auto\n"
          "  accllm sweep --model tiny --grid-file grid.toml --workers 2 --out sweep")


def add_arguments(p) -> None:
    add_model_args(p)
    add_recipe_args(p, default="accllm")
    p.add_argument("--hw", default="u280", help="hardware preset of every point (u280 | sim-small; default %(default)s)")
    p.add_argument("--hw-set", dest="hw_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hardware configuration key for every point (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis of the grid (repeatable): a recipe key, hw.KEY, recipe or hw, and its values")
    p.add_argument("--grid-file", default=None, metavar="FILE", help="TOML file of grid axes (see above)")
    p.add_argument("--data", action="append", default=None, metavar="SOURCE",
                   help="perplexity data (as accllm eval; repeatable; default wikitext2)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per perplexity chunk (default %(default)s)")
    p.add_argument("--chunks", type=int, default=4, help="perplexity chunks per source (default %(default)s)")
    p.add_argument("--prompt", type=int, default=512, help="prompt length for prefill tokens/s (default %(default)s)")
    p.add_argument("--context", type=int, default=None,
                   help="KV tokens when decoding (default: S+W under Λ, else the configured context)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--local", action="store_true", help="run the points in this process, one after another, "
                     "without Ray")
    run.add_argument("--address", default=None, metavar="ADDR",
                     help="join the Ray cluster at ADDR (host:port, or auto) instead of starting a local one")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="CPUs of the local Ray, one point each (default: the machine's cores)")
    p.add_argument("--out", default=None, metavar="DIR", help="write results.json, results.csv and pareto.png here")
    add_progress_args(p)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_args(args) -> None:
    from algo.common import AccllmError
    for name in ("ctx", "chunks", "prompt"):
        if getattr(args, name) < 1:
            raise AccllmError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.context is not None and args.context < 0:
        raise AccllmError(f"--context must be >= 0, got {args.context}")
    if args.workers is not None:
        if args.workers < 1:
            raise AccllmError(f"--workers must be at least 1, got {args.workers}")
        if args.local or args.address:
            raise AccllmError("--workers sizes the local Ray the sweep starts; --local runs one point at a time "
                              "and a cluster joined with --address has its own CPUs")
    if args.out:
        from pathlib import Path
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise AccllmError(f"--out {out} exists and is not a directory")


def _distinct(values) -> list:
    import json
    seen, out = set(), []
    for v in values:
        t = json.dumps(v, sort_keys=True)
        if t not in seen:
            seen.add(t)
            out.append(v)
    return out


def _table(doc: dict, keys: list[str]) -> str:
    pts = doc["points"]
    several = len(doc["data"]) > 1
    head = keys + ["bits/w", "bytes/token", "decode tok/s", "prefill tok/s", "ppl"] + \
        ([f"ppl {d}" for d in doc["data"]] if several else []) + ["pareto", "package"]
    rows = []
    for r in pts:
        row = [str(r[k]) for k in keys]
        if "error" in r:
            rows.append(row + [f"error: {r['error']}"])
            continue
        row += [f"{r['bits_per_weight']:.3f}", f"{r['bytes_per_token']:,}", f"{r['decode_tokens_per_s']:.1f}",
                f"{r['prefill_tokens_per_s']:.1f}", f"{r['ppl']:.3f}"]
        row += [f"{r['ppl_by_data'][d]:.3f}" for d in doc["data"]] if several else []
        row += ["*" if r.get("pareto") else "", "compiled" if r["compiled"] else "cached"]
        rows.append(row)
    widths = [max([len(h)] + [len(r[i]) for r in rows if i < len(r) and not r[i].startswith("error:")])
              for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    for r in rows:
        lines.append("  ".join(c if c.startswith("error:") else c.rjust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)


def run(args) -> int:
    from algo.common import AccllmError, cache_dir
    from host import sweep
    from host.cmd_eval import _check_sources
    from types import SimpleNamespace
    t0 = time.time()
    _check_args(args)
    base = sweep.Base(model=args.model, recipe=args.recipe, recipe_file=args.recipe_file, sets=list(args.sets),
                      hw=args.hw, hw_sets=list(args.hw_sets))
    axes = sweep.parse_grid(args.grid) + (sweep.load_grid_file(args.grid_file) if args.grid_file else [])
    sweep.check_axes(axes)
    sweep.resolve(base, {})                                   # the base recipe and configuration
    sweep.check_values(base, axes)
    data = list(args.data or ["wikitext2"])
    _check_sources(data, SimpleNamespace(plot=None, stream=False))
    points = sweep.make_points(base, axes, data=data, ctx=args.ctx, chunks=args.chunks, prompt=args.prompt,
                               context=args.context, cache_root=cache_dir("sweep"))
    if not points:
        raise AccllmError("the grid has no points")
    progress = not args.no_progress
    mode = "local" if args.local else "ray-cluster" if args.address else "ray-local"
    workers = None if args.local or args.address else (args.workers or _cores())
    if progress:
        print(f"sweep: {len(points)} point(s) of {args.model} "
              + ("in this process" if args.local else f"on Ray ({args.address or f'local, {workers} CPUs'})"),
              file=sys.stderr, flush=True)
    if args.local:
        results = sweep.run_local(points, progress)
    else:
        results = sweep.run_ray(points, progress, workers=workers, address=args.address)
    sweep.mark_pareto(results)
    keys = [k for k, _ in axes]
    failed = sum(1 for r in results if "error" in r)
    doc = {"points": results, "model": args.model, "recipe": args.recipe, "hw": args.hw, "hw_sets": list(args.hw_sets),
           "grid": {k: _distinct(p["settings"][k] for p in points) for k in keys},
           "data": data, "ctx": args.ctx, "chunks": args.chunks, "prompt": args.prompt,
           "mode": mode, "workers": workers, "address": args.address,
           "ok": len(results) - failed, "failed": failed,
           "compiled": sum(1 for r in results if r.get("compiled")),
           "cache_dir": str(cache_dir("sweep")), "wall_seconds": round(time.time() - t0, 3)}
    files = None
    if args.out:
        from pathlib import Path
        d = Path(args.out)
        doc["files"] = {"json": str(d / "results.json"), "csv": str(d / "results.csv"), "plot": str(d / "pareto.png")}
        title = f"{args.model} on {args.hw}: perplexity vs projected decode tokens/s ({len(points)} points)"
        files = sweep.write_outputs(args.out, doc, keys, title)
    rc = 1 if failed == len(results) else 0
    if args.json:
        from host.args import emit_json
        emit_json(args, doc, indent=1)
        return rc
    print(_table(doc, keys))
    print(f"\n{doc['ok']} of {len(results)} point(s) ok, {failed} failed; {doc['compiled']} package(s) compiled, "
          f"{len(results) - failed - doc['compiled']} from the cache ({doc['cache_dir']}); "
          f"{doc['wall_seconds']:.1f} s ({mode})")
    if files:
        print(f"results: {files['json']}, {files['csv']}, {files['plot']}")
    return rc
