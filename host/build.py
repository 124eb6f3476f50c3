"""``compile-model``: the build flow, as FINN-style named steps.

Each step is a function ``step(ctx) -> dict | None`` over one :class:`BuildContext`; the flow times
every step, records the process's peak RSS after it, and stores both in the manifest (``steps``).
The package is assembled in a temporary directory beside ``--out`` and renamed into place only after
the last step succeeded, so an interrupted build never leaves half a package.

Steps (``build_steps``):
  load      load the model (refused early if the recipe cannot apply to its shapes)
  compress  the recipe pipeline (quant.pipeline.prepare): prune, KV calibration, weight/act quant
  pack      packed tensors, per-layer records, footprint (quant.package.package_tensors)
  write     weights.safetensors + manifest.json into the temporary package directory
  [compile_program]  (hw compiler, when --hw is given: added by ``build_steps``; writes program.bin,
                      program.lst, memmap.json into ctx.tmp and records them with ctx.add_file)
  finalize  manifest ``steps``/``files`` complete; the directory is renamed into place
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from algo.common import AccllmError, atomic_directory, sha256_file


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


@dataclass
class BuildContext:
    args: object
    recipe: object
    progress: bool = True
    loaded: object = None
    prepared: object = None
    tensors: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    tmp: Path | None = None          # the temporary package directory (valid from 'write' on)
    extra_files: list = field(default_factory=list)

    def add_file(self, name: str) -> None:
        """Record a file a step wrote into ``ctx.tmp`` (its sha256 goes into the manifest)."""
        self.extra_files.append(name)


# --- steps --------------------------------------------------------------------------------------

def _check_shapes_early(spec: str, recipe) -> None:
    """Group size vs K from the model's shape, before loading weights where the shape is known."""
    from algo.models import model_shape
    if not recipe.weight_bits:
        return
    try:
        shape = model_shape(spec)
    except AccllmError:
        return       # checked again after loading
    from quant.quantizers import check_group
    check_group(shape["hidden_size"], recipe.group_size, f"{spec} (hidden_size)")
    check_group(shape["intermediate_size"], recipe.group_size, f"{spec} (intermediate_size, down_proj)")


def step_load(ctx: BuildContext):
    from algo.models import load_model
    from quant.quantize import check_model
    ctx.loaded = load_model(ctx.args.model)
    check_model(ctx.loaded.model, ctx.recipe)
    cfg = ctx.loaded.config
    return {"model": ctx.args.model, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}


def step_compress(ctx: BuildContext):
    from quant.pipeline import prepare
    ctx.prepared = prepare(ctx.loaded, ctx.recipe, progress=ctx.progress)
    steps = ctx.prepared.report.get("steps", {})
    return {"substeps": {k: v.get("seconds") for k, v in steps.items()}}


def _kv_hook_of(prepared):
    """The KV hook quant.kv.make_kv_hook attached to the model."""
    return getattr(prepared.loaded.model, "accllm_kv_hook", None)


def step_pack(ctx: BuildContext):
    from quant.package import FORMAT, FORMAT_VERSION, package_tensors, tool_version
    lm = ctx.loaded
    hook = _kv_hook_of(ctx.prepared) if ctx.recipe.kv_bits else None
    if ctx.recipe.kv_bits and hook is None:
        raise AccllmError("the KV quantization hook could not be found in the prepared model's cache "
                          "factory; cannot export its constants")
    tensors, meta, layers, footprint = package_tensors(lm.model, hook)
    ctx.tensors = tensors
    cfg = lm.config.to_dict()
    ctx.manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": tool_version(),
        "source": {"spec": lm.spec, "path": lm.source, "sha256": lm.source_sha256},
        "recipe": ctx.recipe.to_dict(), "model_config": cfg, "tensors": meta, "layers": layers,
        "files": {}, "steps": {}, "footprint": footprint,
        "quant_report": {k: v for k, v in ctx.prepared.report.items() if k != "steps"},
    }
    return {"tensors": len(tensors), "bits_per_weight_blocks": footprint["bits_per_weight_blocks"]}


def step_write(ctx: BuildContext):
    from safetensors.torch import save_file
    from quant.package import FORMAT, FORMAT_VERSION, WEIGHTS
    save_file(ctx.tensors, str(ctx.tmp / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    ctx.add_file(WEIGHTS)
    return {"bytes": (ctx.tmp / WEIGHTS).stat().st_size}


def step_finalize(ctx: BuildContext):
    from quant.package import write_manifest
    for name in ctx.extra_files:
        ctx.manifest["files"][name] = sha256_file(ctx.tmp / name)
    write_manifest(ctx.tmp, ctx.manifest)
    os.chmod(ctx.tmp, 0o755)                       # mkdtemp made it private
    for f in ctx.tmp.iterdir():
        os.chmod(f, 0o644)
    return {"files": len(ctx.manifest["files"]) + 1}


def build_steps(args) -> list[tuple[str, Callable]]:
    steps = [("load", step_load), ("compress", step_compress), ("pack", step_pack), ("write", step_write)]
    # with --hw, the accelerator compile step runs here, before "finalize" (it may write into ctx.tmp,
    # call ctx.add_file(name), and set ctx.manifest["hw"]).
    if getattr(args, "hw", None):
        from hw.compiler import build_step
        steps.append(("compile_program", build_step))
    steps.append(("finalize", step_finalize))
    return steps


# --- driver --------------------------------------------------------------------------------------

def _summary(ctx: BuildContext, out: Path, total_s: float) -> list[tuple[str, str]]:
    fp = ctx.manifest.get("footprint", {})
    rows = [("model", ctx.args.model), ("recipe", f"{ctx.recipe.name}: {ctx.recipe.summary()}"),
            ("package", str(out))]
    for name, st in ctx.manifest.get("steps", {}).items():
        rows.append((f"step {name}", f"{st['seconds']:8.1f} s   peak RSS {st['peak_rss_mb']:8.1f} MB"))
    if fp:
        rows += [("bits/weight (blocks)", f"{fp['bits_per_weight_blocks']:.4f}  (codes + zeros + scales + indices)"),
                 ("bits/weight (+lm_head)", f"{fp['bits_per_weight_linear']:.4f}"),
                 ("bits/weight (all)", f"{fp['bits_per_weight_total']:.4f}  (embedding and norms included)"),
                 ("bytes (tensors)", f"{fp['bytes_total_tensors']:,}")]
    rows += [("time", f"{total_s:.1f} s"), ("peak memory", f"{peak_rss_mb():.1f} MB")]
    return rows


def compile_model(args) -> int:
    from host.args import recipe_from_args
    from algo.eval import format_table
    recipe = recipe_from_args(args)                     # refused before any work
    _check_shapes_early(args.model, recipe)
    if getattr(args, "hw", None):                       # what the accelerator cannot run: before any work
        from hw.compiler import check_recipe_for_hw
        from hw.config import load_hw
        check_recipe_for_hw(recipe, load_hw(args.hw, getattr(args, "hw_sets", None)))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AccllmError(f"--out {out} exists and is not a directory")
    progress = not getattr(args, "no_progress", False)
    ctx = BuildContext(args=args, recipe=recipe, progress=progress)
    steps = build_steps(args)
    names = [n for n, _ in steps]
    stop_after = getattr(args, "stop_after", None)
    if stop_after and stop_after not in names:
        raise AccllmError(f"--stop-after {stop_after!r}: not a step; steps: {', '.join(names)}")
    t_all = time.time()
    early: dict = {}
    try:
        with atomic_directory(out) as tmp:
            ctx.tmp = tmp
            for name, fn in steps:
                t0 = time.time()
                info = fn(ctx) or {}
                rec = {"seconds": round(time.time() - t0, 3), "peak_rss_mb": peak_rss_mb(), **info}
                early[name] = rec
                if "steps" in ctx.manifest:
                    ctx.manifest["steps"] = dict(early)
                if progress:
                    print(f"[{name}] {rec['seconds']:.1f} s, peak RSS {rec['peak_rss_mb']:.0f} MB",
                          file=sys.stderr, flush=True)
                if stop_after == name and name != names[-1]:
                    raise _Stop
    except _Stop:
        ctx.manifest.setdefault("steps", early)
        print(f"stopped after step {stop_after}; no package written", file=sys.stderr)
    return _report(ctx, out, time.time() - t_all, args)


class _Stop(Exception):
    pass


def _report(ctx, out, total_s, args) -> int:
    from algo.eval import format_table
    if getattr(args, "json", False):
        print(json.dumps({"package": str(out), "recipe": ctx.recipe.to_dict(), "steps": ctx.manifest.get("steps", {}),
                          "footprint": ctx.manifest.get("footprint", {}), "seconds": round(total_s, 3),
                          "peak_rss_mb": peak_rss_mb()}))
    else:
        print(format_table(_summary(ctx, out, total_s)))
    return 0
