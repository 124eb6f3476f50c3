"""``compile-model`` (also ``accllm compile``): model → compressed package (→ accelerator program).

Named build steps in the manner of FINN (host/build.py): each step is timed, ``--stop-step`` ends the
flow after a step with its artefacts saved under ``OUT/steps/``, ``--start-step`` resumes from them."""
from __future__ import annotations

from .args import RECIPE_EPILOG, add_model_args, add_progress_args, add_recipe_args
from .build import describe_steps

DESCRIPTION = """Compress a Llama-family model with a recipe into a package directory:
manifest.json (format version, source model hash, recipe, tensors, sha256 of every file) and
weights.safetensors (packed low-bit codes, zero points, scales). The package is written to a
temporary directory and renamed into place, so an interrupted run never leaves half a package."""

EPILOG = ("build steps, in order (a step whose recipe keys or options are off does not run; each is timed "
          "with its peak RSS in the package's steps.json):\n" + describe_steps() + "\n\n"
          "examples:\n"
          "  compile-model --model smollm2-135m --recipe w2a8kv4 --out build/smollm2\n"
          "  compile-model --model tiny --recipe accllm --hw sim-small --out D --stop-step quantize\n"
          "  compile-model --model tiny --recipe accllm --hw sim-small --out D --start-step pack\n"
          "  compile-model --model DIR --recipe accllm --hw u280 --out D --stream-blocks on --save-steps\n"
          "      (killed? the same command with --start-step blocks continues after the last block saved)\n\n"
          + RECIPE_EPILOG)


def add_arguments(p) -> None:
    add_model_args(p)
    add_recipe_args(p, default="w2a8kv4")
    p.add_argument("--out", required=True, metavar="DIR", help="package directory to write")
    p.add_argument("--stop-step", default=None, metavar="STEP",
                   help="end the build after this step (see the list below), keeping each finished step's "
                        "artefact under OUT/steps/; no package is written unless STEP is finalize")
    p.add_argument("--start-step", default=None, metavar="STEP",
                   help="resume the build at this step from the artefacts a run with --stop-step (or "
                        "--save-steps) left under OUT/steps/; the same options are required")
    p.add_argument("--save-steps", action="store_true",
                   help="keep every finished step's artefact under OUT/steps/ (a killed build can then be "
                        "resumed with --start-step); the artefacts stay in the package directory")
    p.add_argument("--stream-blocks", default="auto", choices=("auto", "on", "off"),
                   help="compress block by block from the memory-mapped safetensors shards, never holding the "
                        "float model whole (same package bytes; docs/scale.md): on, off, or auto (default: on when "
                        "the float32 weights exceed 4 GiB, e.g. a 7B model)")
    p.add_argument("--hw", default=None, metavar="CONFIG",
                   help="also compile for the accelerator: sim-small | u280 (adds program.bin, program.lst, "
                        "memmap.json, hbm_w<p>.bin and 'hw' in the manifest)")
    p.add_argument("--hw-set", dest="hw_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hardware configuration key (repeatable)")
    p.add_argument("--package", default=None, metavar="DIR",
                   help="stage 2 only: compile this existing package for --hw again (no recompression; "
                        "e.g. after an accllm update changed the memory map) into --out (may be DIR itself); "
                        "--set may change the attention-time keys token_keep, head_keep, spatten_start_layer, "
                        "spatten_recent (SpAtten), recorded in the package's recipe")
    add_progress_args(p)


def run(args) -> int:
    if args.package:
        return recompile_package(args)
    from host.build import compile_model
    return compile_model(args)


def recompile_package(args) -> int:
    import time
    from pathlib import Path
    from algo.common import AccllmError
    from hw.compiler import recompile
    from hw.config import load_hw
    src, out = Path(args.package), Path(args.out)
    if not (src / "manifest.json").is_file():
        raise AccllmError(f"--package {src}: not a package directory (no manifest.json)")
    if not args.hw:
        raise AccllmError("--package needs --hw CONFIG (sim-small | u280): the configuration to compile for")
    if args.recipe_file or args.stop_step or args.start_step or args.save_steps:
        raise AccllmError("--package recompiles the accelerator program only: --recipe-file, --stop-step, "
                          "--start-step and --save-steps belong to a full compile (without --package)")
    hw = load_hw(args.hw, args.hw_sets)
    recipe = None
    if args.sets:
        import json
        from algo.recipe import apply_attention_sets, recipe_from_dict
        man = json.loads((src / "manifest.json").read_text())
        recipe = apply_attention_sets(recipe_from_dict(man["recipe"]), args.sets)      # checked before any work
    t = time.time()
    same = out.resolve() == src.resolve()
    recompile(src, hw, out_dir=None if same else out, progress=not args.no_progress, recipe=recipe)
    if args.json:
        import json
        from host.args import emit_json
        man = json.loads((out / "manifest.json").read_text())
        emit_json(args, {"package": str(out), "source_package": str(src), "in_place": same, "hw": hw.name,
                         "recipe": man["recipe"], "recipe_changes": man.get("recipe_changes", []),
                         "seconds": round(time.time() - t, 3)})
        return 0
    print(f"compiled {src} for {hw.name} into {out}{' (in place)' if same else ''} ({time.time() - t:.1f} s)")
    return 0
