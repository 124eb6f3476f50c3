"""``compile-model``: the build flow, as named steps over one typed build configuration.

Steps (:data:`STEPS`, in order; a step whose recipe keys or options are off does not run):

  load          load the model (refused early if the recipe cannot apply to its shapes)
  smooth, prune, kv-calibrate, attention, quantize
                the recipe pipeline (quant.pipeline.COMPRESS_STEPS), one step each
  blocks        instead of those with --stream-blocks (quant/stream.py, docs/scale.md): the same steps
                one decoder block at a time, each block loaded from the safetensors shards and packed in
                turn; with saved steps each finished block is kept under OUT/steps/.blocks.progress/ and
                ``--start-step blocks`` continues after the last one
  pack          packed tensors, per-layer records, footprint; weights.safetensors
  program       the accelerator program for --hw (program.bin, program.lst, memmap.json, hbm_w<p>.bin)
  finalize      build_config.json, steps.json and manifest.json; the package is renamed into place

Every step is timed with the process's peak RSS after it; the package's ``steps.json`` lists them.
With ``--stop-step``, ``--start-step`` or ``--save-steps`` each finished step leaves its artefact under
``OUT/steps/NAME/`` (the compressed model after a compression step, the packed weights after pack, the
program files after program), written to a temporary name and renamed, so a killed build can be resumed
from the last finished step. ``--start-step NAME`` resumes from those artefacts if they were made by the
same build configuration and the same accllm sources; the resumed package is byte-identical to a
one-shot build. The package itself is assembled in a temporary directory beside ``OUT`` and renamed
into place only after the last step succeeded.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from algo.common import AccllmError, atomic_directory, atomic_write_text, sha256_file

STEPS_DIR = "steps"
BUILD_CONFIG = "build_config.json"
STEPS_JSON = "steps.json"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def sources_digest() -> str:
    """Hash of the accllm sources that decide a package's bytes (algo/, quant/, hw/): artefacts saved by
    one version of them are not resumed by another."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for folder in ("algo", "quant", "hw"):
        for f in sorted((root / folder).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# --- the build configuration ----------------------------------------------------------------------

@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides a package's bytes; saved as ``build_config.json`` in the package and
    beside saved step artefacts (a resume is refused when it differs)."""
    model: str
    recipe: dict
    hw: str | None = None
    hw_sets: tuple[str, ...] = ()
    sources: str = ""                 # sources_digest() of the accllm that built it

    @classmethod
    def from_args(cls, args, recipe) -> "BuildConfig":
        return cls(model=str(args.model), recipe=recipe.to_dict(), hw=getattr(args, "hw", None) or None,
                   hw_sets=tuple(getattr(args, "hw_sets", None) or ()), sources=sources_digest())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hw_sets"] = list(self.hw_sets)
        return d

    @classmethod
    def from_dict(cls, d, origin: str) -> "BuildConfig":
        types = {"model": str, "recipe": dict, "hw": (str, type(None)), "hw_sets": list, "sources": str}
        if not isinstance(d, dict) or set(d) != set(types):
            raise AccllmError(f"{origin}: not a build configuration (expected the keys {', '.join(types)})")
        for k, t in types.items():
            if not isinstance(d[k], t) or (k == "hw_sets" and not all(isinstance(s, str) for s in d[k])):
                raise AccllmError(f"{origin}: {k} has the wrong type ({type(d[k]).__name__})")
        return cls(model=d["model"], recipe=d["recipe"], hw=d["hw"], hw_sets=tuple(d["hw_sets"]), sources=d["sources"])

    def differences(self, other: "BuildConfig") -> list[str]:
        out = []
        a, b = self.to_dict(), other.to_dict()
        for k in a:
            if k == "recipe":
                out += [f"recipe key {r}: {b['recipe'].get(r)!r} there, {a['recipe'].get(r)!r} now"
                        for r in sorted(set(a["recipe"]) | set(b["recipe"])) if a["recipe"].get(r) != b["recipe"].get(r)]
            elif a[k] != b[k]:
                out.append(f"{'accllm sources (digest)' if k == 'sources' else k}: {b[k]!r} there, {a[k]!r} now")
        return out


# --- context and steps ----------------------------------------------------------------------------

@dataclass
class BuildContext:
    args: object
    recipe: object
    config: BuildConfig
    progress: bool = True
    loaded: object = None
    prepared: object = None
    calib: object = None
    manifest: dict = field(default_factory=dict)
    tmp: Path | None = None          # the temporary package directory
    files: list = field(default_factory=list)      # files written into tmp (their sha256 go into the manifest)
    records: list = field(default_factory=list)    # steps.json
    t_step: float = 0.0
    stream: bool = False             # block-streamed compression (the blocks step; docs/scale.md)
    store: object = None             # the StepStore when steps are saved
    packed: object = None            # the blocks step's result: (tensors, meta, layers, footprint)
    wrote: dict = field(default_factory=dict)      # step -> (files it added, manifest keys it set)

    def add_file(self, name: str) -> None:
        if name not in self.files:
            self.files.append(name)


@dataclass(frozen=True)
class BuildStep:
    name: str
    doc: str
    applies: Callable[[BuildContext], bool]
    run: Callable[[BuildContext], dict | None]
    save: Callable[["StepStore", BuildContext, Path, str], None] | None = None   # its artefact
    restore: Callable[["StepStore", BuildContext, Path], None] | None = None   # the state after it
    replayed: bool = False      # cheap and deterministic: saves no state, runs again on a resume after it


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


def _family_recipe(args, recipe):
    """A model directory's family checked before any work, and the recipe as it runs on that family
    (Mistral's sliding window: algo.models.family_recipe; the adapted recipe is the one recorded)."""
    from algo.models import check_model_config, family_recipe, read_config
    cfg = read_config(args.model)
    if cfg is None:
        return recipe
    check_model_config(cfg, str(args.model))
    recipe, note = family_recipe(recipe, cfg)
    if note and not getattr(args, "no_progress", False):
        print(note, file=sys.stderr, flush=True)
    return recipe


def _load(ctx: BuildContext) -> dict:
    from algo.models import load_model, load_model_streamed
    from quant.pipeline import Calibration, Prepared
    from quant.quantize import check_model
    if ctx.stream:
        from quant.stream import check_streamable
        check_streamable(ctx.recipe)
        ctx.loaded = load_model_streamed(ctx.args.model)
    else:
        ctx.loaded = load_model(ctx.args.model)
    check_model(ctx.loaded.model, ctx.recipe)
    ctx.prepared = Prepared(ctx.loaded, ctx.recipe)
    ctx.calib = Calibration(ctx.loaded.tokenizer, ctx.recipe)
    cfg = ctx.loaded.config
    return {"model": ctx.args.model, "source_sha256": ctx.loaded.source_sha256,
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}


def _restore_load(store: "StepStore", ctx: BuildContext, d: Path) -> None:
    """The state after load is the source model: loaded again, and checked to be the same file."""
    saved = store.record(d.name).get("source_sha256")
    _load(ctx)
    if saved and ctx.loaded.source_sha256 and saved != ctx.loaded.source_sha256:
        raise AccllmError(f"--start-step: the model {ctx.args.model} changed since its steps were saved "
                          f"(sha256 {ctx.loaded.source_sha256[:12]}…, saved {saved[:12]}…); build from the start")


def _compress_step(cs) -> BuildStep:
    def run(ctx):
        return cs.run(ctx.prepared, ctx.calib, ctx.progress)
    def applies(ctx):
        return cs.applies(ctx.recipe) and not ctx.stream     # streamed: done block by block by the blocks step
    if cs.name == "attention":         # installs the cache factory and SpAtten: no weights change
        return BuildStep(cs.name, cs.doc, applies, run, replayed=True)
    return BuildStep(cs.name, cs.doc, applies, run, _save_model, _restore_model)


BLOCKS_PROGRESS = ".blocks.progress"


def _blocks(ctx: BuildContext) -> dict:
    from quant.stream import compress_streamed
    progress_dir = ctx.store.root / BLOCKS_PROGRESS if ctx.store is not None else None
    ctx.packed = compress_streamed(ctx.prepared, ctx.calib, ctx.progress, progress_dir)
    return {"blocks": ctx.loaded.config.num_hidden_layers, "tensors": len(ctx.packed[0])}


def _save_blocks(store: "StepStore", ctx: BuildContext, d: Path, step: str) -> None:
    from quant.stream import save_packed
    save_packed(d, ctx.packed, ctx.prepared.report)
    shutil.rmtree(store.root / BLOCKS_PROGRESS, ignore_errors=True)   # the per-block artefacts, now whole


def _restore_blocks(store: "StepStore", ctx: BuildContext, d: Path) -> None:
    from quant.stream import load_packed
    ctx.packed, ctx.prepared.report = load_packed(d)


def _save_model(store: "StepStore", ctx: BuildContext, d: Path, step: str) -> None:
    """The compressed model so far (pickled whole: quantizers and the KV hook are part of it)."""
    import torch
    from algo.attention import patch_attention, unpatch_attention
    model = ctx.loaded.model
    patched = unpatch_attention(model)
    try:
        state = {"loaded": ctx.loaded, "report": ctx.prepared.report, "patched": patched > 0,
                 "rng": torch.get_rng_state()}
        torch.save(state, d / "state.pt")
    finally:
        if patched:
            patch_attention(model)


def _restore_model(store: "StepStore", ctx: BuildContext, d: Path) -> None:
    import torch
    from algo.attention import patch_attention
    from quant.pipeline import Calibration, Prepared
    # our own file, written by _save_model: a whole model needs the full unpickler
    state = torch.load(d / "state.pt", weights_only=False)
    ctx.loaded = state["loaded"]
    if state["patched"]:
        patch_attention(ctx.loaded.model)
    ctx.prepared = Prepared(ctx.loaded, ctx.recipe, report=state["report"])
    if "attention" in state["report"].get("steps", {}):      # the attention step set it up
        ctx.prepared.refresh_cache_factory()
    ctx.calib = Calibration(ctx.loaded.tokenizer, ctx.recipe)
    torch.set_rng_state(state["rng"])


def _pack(ctx: BuildContext) -> dict:
    from quant.package import FORMAT, FORMAT_VERSION, WEIGHTS, package_tensors, save_weights, tool_version
    lm = ctx.loaded
    if ctx.stream:               # packed block by block by the blocks step
        tensors, meta, layers, footprint = ctx.packed
    else:
        hook = ctx.prepared.kv_hook if ctx.recipe.kv_bits else None
        if ctx.recipe.kv_bits and hook is None:
            raise AccllmError("the prepared model has no KV quantization hook (kv-calibrate did not run); "
                              "cannot export its constants")
        tensors, meta, layers, footprint = package_tensors(lm.model, hook)
    ctx.manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": tool_version(),
        "source": {"spec": lm.spec, "path": lm.source, "sha256": lm.source_sha256},
        "recipe": ctx.recipe.to_dict(), "model_config": lm.config.to_dict(), "tensors": meta, "layers": layers,
        "files": {}, "footprint": footprint,
        # what each compression step measured (errors per layer, calibration, block tuning)
        "quant_report": {**ctx.prepared.report.get("steps", {}),
                         **{k: v for k, v in ctx.prepared.report.items() if k != "steps"}},
    }
    save_weights(tensors, ctx.tmp / WEIGHTS)
    ctx.add_file(WEIGHTS)
    ctx.packed = None
    for n in _save_tokenizer(lm.tokenizer, ctx.tmp):     # the package runs from its directory alone
        ctx.add_file(n)
    return {"tensors": len(tensors), "bytes": (ctx.tmp / WEIGHTS).stat().st_size,
            "bits_per_weight_blocks": footprint["bits_per_weight_blocks"]}


def _save_tokenizer(tokenizer, directory: Path) -> list[str]:
    """The tokenizer's files (tokenizer.json and its configuration) into *directory*; their names."""
    before = {p.name for p in directory.iterdir()}
    tokenizer.save_pretrained(str(directory))
    names = sorted(p.name for p in directory.iterdir() if p.name not in before and p.is_file())
    if "tokenizer.json" not in names:
        raise AccllmError(f"the model's tokenizer ({type(tokenizer).__name__}) wrote no tokenizer.json; "
                          "accllm packages need a fast (tokenizers) tokenizer")
    return names


def _save_files(store: "StepStore", ctx: BuildContext, d: Path, step: str) -> None:
    files, keys = ctx.wrote[step]
    for n in files:
        _link_or_copy(ctx.tmp / n, d / n)
    part = {k: ctx.manifest[k] for k in keys}
    atomic_write_text(d / "manifest_part.json", json.dumps({"files": files, "manifest": part}, indent=1))


def _restore_files(store: "StepStore", ctx: BuildContext, d: Path) -> None:
    part = json.loads((d / "manifest_part.json").read_text())
    for n in part["files"]:
        _link_or_copy(d / n, ctx.tmp / n)
        ctx.add_file(n)
    ctx.manifest.update(part["manifest"])


def _program(ctx: BuildContext) -> dict:
    from hw.compiler import compile_to_dir, program_files
    from hw.config import load_hw
    from quant.package import Package
    hw = load_hw(ctx.args.hw, getattr(ctx.args, "hw_sets", None))
    upd = compile_to_dir(Package(Path(ctx.tmp), ctx.manifest), hw, ctx.tmp, progress=ctx.progress)
    ctx.manifest.update(upd)
    for n in program_files(ctx.tmp) + [f"hbm_w{p}.bin" for p in range(hw.weight_ports)]:
        ctx.add_file(n)
    return {"hw": hw.name, "words": upd["program"]["words"],
            "weight_bytes": sum(upd["program"]["weight_bytes_per_port"])}


def _finalize(ctx: BuildContext) -> dict:
    from quant.package import write_manifest
    atomic_write_text(ctx.tmp / BUILD_CONFIG, json.dumps(ctx.config.to_dict(), indent=1) + "\n")
    ctx.add_file(BUILD_CONFIG)
    # finalize's own record covers the work up to here (the rest is writing two small files)
    ctx.records.append(_record("finalize", ctx.t_step, None)[0])
    atomic_write_text(ctx.tmp / STEPS_JSON, json.dumps(ctx.records, indent=1) + "\n")
    ctx.add_file(STEPS_JSON)
    for name in ctx.files:
        ctx.manifest["files"][name] = sha256_file(ctx.tmp / name)
    write_manifest(ctx.tmp, ctx.manifest)
    os.chmod(ctx.tmp, 0o755)                       # mkdtemp made it private
    for f in ctx.tmp.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)
    return None


def _steps() -> tuple[BuildStep, ...]:
    from quant.pipeline import COMPRESS_STEPS
    return (BuildStep("load", "load the model and check that the recipe applies to it", lambda ctx: True, _load,
                      None, _restore_load),
            *[_compress_step(cs) for cs in COMPRESS_STEPS],
            BuildStep("blocks", "block-streamed compression (--stream-blocks): each decoder block loaded, pruned, "
                      "KV-calibrated, quantized, block-tuned and packed in turn", lambda ctx: ctx.stream, _blocks,
                      _save_blocks, _restore_blocks),
            BuildStep("pack", "packed low-bit tensors and per-layer records: weights.safetensors",
                      lambda ctx: True, _pack, _save_files, _restore_files),
            BuildStep("program", "the accelerator program for --hw: program.bin, program.lst, memmap.json, "
                      "hbm_w<p>.bin", lambda ctx: bool(getattr(ctx.args, "hw", None)), _program,
                      _save_files, _restore_files),
            BuildStep("finalize", "build_config.json, steps.json, manifest.json; the package is renamed into place",
                      lambda ctx: True, _finalize))


STEPS: tuple[BuildStep, ...] = _steps()
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)


def describe_steps() -> str:
    w = max(len(n) for n in STEP_NAMES)
    return "\n".join(f"  {s.name:<{w}}  {s.doc}" for s in STEPS)


def _record(name: str, t0: float, info: dict | None) -> dict:
    """One entry of steps.json; the step's facts (*info*) stay in its saved step.json and, for the
    compression steps, in the manifest's quant_report."""
    rec = {"name": name, "seconds": round(time.time() - t0, 3), "peak_rss_mb": peak_rss_mb()}
    return rec, {**(info or {}), **rec}


# --- saved step artefacts -------------------------------------------------------------------------

def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)                        # same file system: no second copy on disk
    except OSError:
        shutil.copy2(src, dst)


class StepStore:
    """``OUT/steps/``: the build configuration and one directory per finished step (``step.json`` and its
    artefact), each written under a temporary name and renamed."""

    def __init__(self, out: Path):
        self.root = out / STEPS_DIR

    def exists(self) -> bool:
        return (self.root / BUILD_CONFIG).is_file()

    def config(self) -> BuildConfig:
        p = self.root / BUILD_CONFIG
        try:
            return BuildConfig.from_dict(json.loads(p.read_text()), str(p))
        except (OSError, ValueError) as e:
            raise AccllmError(f"{p}: cannot read the saved build configuration ({e})") from None

    def reset(self, config: BuildConfig) -> None:
        """Start a new set of artefacts (the old ones, all ours, are removed)."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        atomic_write_text(self.root / BUILD_CONFIG, json.dumps(config.to_dict(), indent=1) + "\n")
        os.chmod(self.root / BUILD_CONFIG, 0o644)

    def has(self, name: str) -> bool:
        return (self.root / name / "step.json").is_file()

    def record(self, name: str) -> dict:
        return json.loads((self.root / name / "step.json").read_text())

    def save(self, step: BuildStep, ctx: BuildContext, record: dict) -> None:
        final = self.root / step.name
        tmp = self.root / f".{step.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            if step.save is not None:
                step.save(self, ctx, tmp, step.name)
            (tmp / "step.json").write_text(json.dumps(record, indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def drop_from(self, names: list[str]) -> None:
        """Remove the artefacts of the steps about to run again (they would be stale)."""
        for n in names:
            shutil.rmtree(self.root / n, ignore_errors=True)

    def size_mb(self) -> float:
        return round(sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()) / 2**20, 1)


# --- the output directory -------------------------------------------------------------------------

def check_out_dir(out: Path) -> None:
    """Refuse an --out that compile-model could not write, or whose contents it did not write (they would
    be replaced), before any work."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise AccllmError(f"--out {out} exists and is not a directory; give a new or empty directory, "
                              "or an accllm package to replace")
        entries = sorted(p.name for p in out.iterdir())
        ours = {STEPS_DIR}
        if (out / "manifest.json").is_file():
            try:
                man = json.loads((out / "manifest.json").read_text())
                ours |= {"manifest.json", *man.get("files", {})} if man.get("format") == "accllm-package" else set()
            except (OSError, ValueError, AttributeError):
                pass
        if STEPS_DIR in entries and not (out / STEPS_DIR / BUILD_CONFIG).is_file():
            ours.discard(STEPS_DIR)
        foreign = [e for e in entries if e not in ours]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise AccllmError(f"--out {out} holds files accllm did not write ({shown}); they would be replaced. "
                              "Give a new or empty directory, or an accllm package to replace")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    resolved = parent.resolve()
    if not resolved.is_dir():
        raise AccllmError(f"--out {out}: {parent} is not a directory")
    if any(resolved == Path(p) or Path(p) in resolved.parents for p in ("/proc", "/sys", "/dev")):
        raise AccllmError(f"--out {out}: {resolved} is a system file system, not a place for a package")
    if not os.access(resolved, os.W_OK | os.X_OK):
        raise AccllmError(f"--out {out}: {resolved} is not writable")


# --- driver ---------------------------------------------------------------------------------------

def _step_index(option: str, name: str | None) -> int | None:
    if name is None:
        return None
    if name not in STEP_NAMES:
        raise AccllmError(f"{option} {name!r}: not a build step; steps: {', '.join(STEP_NAMES)}")
    return STEP_NAMES.index(name)


def _summary(ctx: BuildContext, out: Path, total_s: float, store: StepStore | None) -> list[tuple[str, str]]:
    fp = ctx.manifest.get("footprint", {})
    rows = [("model", ctx.args.model), ("recipe", f"{ctx.recipe.name}: {ctx.recipe.summary()}"),
            ("package", str(out) if (out / "manifest.json").is_file() and ctx.records[-1]["name"] == "finalize"
             else "(not written: stopped early)")]
    for r in ctx.records:
        saved = "  (saved step)" if r.get("resumed") else ""
        rows.append((f"step {r['name']}", f"{r['seconds']:8.1f} s   peak RSS {r['peak_rss_mb']:8.1f} MB{saved}"))
    if fp:
        rows += [("bits/weight (blocks)", f"{fp['bits_per_weight_blocks']:.4f}  (codes + zeros + scales + indices)"),
                 ("bits/weight (+lm_head)", f"{fp['bits_per_weight_linear']:.4f}"),
                 ("bits/weight (all)", f"{fp['bits_per_weight_total']:.4f}  (embedding and norms included)"),
                 ("bytes (tensors)", f"{fp['bytes_total_tensors']:,}")]
    if store is not None and store.root.exists():
        rows.append(("step artefacts", f"{store.root} ({store.size_mb():,.1f} MB)"))
    rows += [("time", f"{total_s:.1f} s"), ("peak memory", f"{peak_rss_mb():.1f} MB")]
    return rows


STREAM_CHOICES = ("auto", "on", "off")


def stream_blocks(spec: str, mode: str, recipe) -> bool:
    """Whether compile-model streams blocks: ``on``, ``off``, or ``auto`` — on when the model's float32
    weights (from its shape) exceed algo.models.STREAM_THRESHOLD_BYTES and the recipe can be streamed."""
    if mode not in STREAM_CHOICES:
        raise AccllmError(f"--stream-blocks {mode!r}: accepted {', '.join(STREAM_CHOICES)}")
    if mode != "auto":
        return mode == "on"
    from algo.models import STREAM_THRESHOLD_BYTES, float32_bytes
    size = float32_bytes(spec)
    if size is None or size <= STREAM_THRESHOLD_BYTES:
        return False
    from quant.stream import check_streamable
    check_streamable(recipe)        # a model this big cannot be compiled whole here either: say why
    return True


def compile_model(args, recipe=None) -> int:
    """The build of ``compile-model`` (*args* as its parser makes them); *recipe*, when given, is the
    validated recipe to build instead of the one --recipe, --recipe-file and --set describe."""
    from host.args import recipe_from_args
    if recipe is None:
        recipe = recipe_from_args(args)                 # refused before any work
    start = _step_index("--start-step", getattr(args, "start_step", None))
    stop = _step_index("--stop-step", getattr(args, "stop_step", None))
    if start is not None and stop is not None and start > stop:
        raise AccllmError(f"--start-step {args.start_step} comes after --stop-step {args.stop_step}; "
                          f"steps in order: {', '.join(STEP_NAMES)}")
    _check_shapes_early(args.model, recipe)
    recipe = _family_recipe(args, recipe)
    if getattr(args, "hw", None):                       # what the accelerator cannot run: before any work
        from hw.compiler import check_recipe_for_hw
        from hw.config import load_hw
        check_recipe_for_hw(recipe, load_hw(args.hw, getattr(args, "hw_sets", None)))
    out = Path(args.out)
    check_out_dir(out)
    config = BuildConfig.from_args(args, recipe)
    progress = not getattr(args, "no_progress", False)
    ctx = BuildContext(args=args, recipe=recipe, config=config, progress=progress,
                       stream=stream_blocks(args.model, getattr(args, "stream_blocks", None) or "auto", recipe))
    save = start is not None or stop is not None or bool(getattr(args, "save_steps", False))
    store = StepStore(out) if save else None
    ctx.store = store
    t_all = time.time()
    try:
        with atomic_directory(out) as tmp:
            ctx.tmp = Path(tmp)
            _run_steps(ctx, store, start or 0, stop if stop is not None else len(STEPS) - 1)
            if store is not None:
                os.replace(store.root, ctx.tmp / STEPS_DIR)     # the artefacts stay with the package
    except _Stopped:
        nxt = next((s.name for s in STEPS[stop + 1:] if s.applies(ctx)), "finalize")
        print(f"stopped after step {STEP_NAMES[stop]}; no package written; the finished steps are saved in "
              f"{store.root}: continue with --start-step {nxt} --out {out}", file=sys.stderr)
    return _report(ctx, out, time.time() - t_all, args, store)


def _run_steps(ctx: BuildContext, store: StepStore | None, first: int, last: int) -> None:
    if first > 0:
        _resume(ctx, store, first)
    elif store is not None:
        store.root.parent.mkdir(parents=True, exist_ok=True)
        store.reset(ctx.config)
    for step in STEPS[first:last + 1]:
        if not step.applies(ctx):
            continue
        ctx.t_step = time.time()
        before_files, before_man = len(ctx.files), dict(ctx.manifest)
        info = step.run(ctx)
        ctx.wrote[step.name] = (ctx.files[before_files:],
                                [k for k, v in ctx.manifest.items() if k not in before_man or v is not before_man[k]])
        if step.name != "finalize":          # finalize records itself before it writes steps.json
            rec, full = _record(step.name, ctx.t_step, info)
            ctx.records.append(rec)
            if store is not None:
                store.save(step, ctx, full)
        rec = ctx.records[-1]
        if ctx.progress:
            print(f"[{step.name}] {rec['seconds']:.1f} s, peak RSS {rec['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    if STEPS[last].name != "finalize":
        raise _Stopped


class _Stopped(Exception):
    pass


def _resume(ctx: BuildContext, store: StepStore, first: int) -> None:
    name = STEP_NAMES[first]
    if not store.exists():
        raise AccllmError(f"--start-step {name}: {store.root} holds no saved build steps; run with --stop-step "
                          f"(or --save-steps) into the same --out first")
    diff = ctx.config.differences(store.config())
    if diff:
        raise AccllmError(f"--start-step {name}: the steps saved in {store.root} were made by another build "
                          "configuration (" + "; ".join(diff[:6]) + "); resume with the same options, or build "
                          "from the start")
    before = [s for s in STEPS[:first]]
    # what ran before: every applicable step needs its saved record (load always applies)
    for s in before:
        if s.name == "load" or (s.name != "finalize" and s.applies(ctx)):
            if not store.has(s.name):
                have = [n for n in STEP_NAMES if store.has(n)]
                raise AccllmError(f"--start-step {name}: step {s.name} has no saved artefact in {store.root} "
                                  f"(saved: {', '.join(have) or 'none'}); start at {s.name} or earlier")
            rec = store.record(s.name)
            ctx.records.append({"name": rec["name"], "seconds": rec["seconds"], "peak_rss_mb": rec["peak_rss_mb"],
                                "resumed": True})
    ran = [s for s in before if s.name == "load" or s.applies(ctx)]
    is_model = [s.restore in (_restore_model, _restore_load) for s in ran]
    if STEP_NAMES.index("pack") >= first:                 # a model is needed: the newest one saved ...
        base = max(i for i, m in enumerate(is_model) if m)
        ran[base].restore(store, ctx, store.root / ran[base].name)
        for s in ran[base + 1:]:                          # ... and the cheap steps after it, run again
            if s.replayed:
                s.run(ctx)
    for s, m in zip(ran, is_model):                       # files of the steps after the model
        if not m and s.restore is not None:
            s.restore(store, ctx, store.root / s.name)
    store.drop_from(list(STEP_NAMES[first:]))
    if ctx.progress:
        print(f"resuming at step {name} from {store.root} (saved: {', '.join(s.name for s in ran)})",
              file=sys.stderr, flush=True)


def _report(ctx, out, total_s, args, store) -> int:
    from algo.eval import format_table
    if getattr(args, "json", False):
        from host.args import emit_json
        emit_json(args, {"package": str(out), "recipe": ctx.recipe.to_dict(), "steps": ctx.records,
                          "footprint": ctx.manifest.get("footprint", {}), "seconds": round(total_s, 3),
                          "peak_rss_mb": peak_rss_mb()})
    else:
        print(format_table(_summary(ctx, out, total_s, store)))
    return 0
