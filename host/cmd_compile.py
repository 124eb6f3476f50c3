"""``compile-model`` (also ``accllm compile``): model → compressed package (→ accelerator program).

Named build steps in the manner of FINN: each step is timed, its artefacts are saved in the
package, and ``--stop-after STEP`` ends the flow early for inspection."""
from __future__ import annotations

from .args import RECIPE_EPILOG, add_model_args, add_progress_args, add_recipe_args

DESCRIPTION = """Compress a Llama-family model with a recipe into a package directory:
manifest.json (format version, source model hash, recipe, tensors, sha256 of every file) and
weights.safetensors (packed low-bit codes, zero points, scales). The package is written to a
temporary directory and renamed into place, so an interrupted run never leaves half a package."""
EPILOG = ("build steps: load, compress (prune / KV calibration / weight+activation quantization), pack, "
          "write, finalize; each is timed with its peak RSS in manifest.json.\n"
          "example: compile-model --model smollm2-135m --recipe w2a8kv4 --out build/smollm2\n\n" + RECIPE_EPILOG)


def add_arguments(p) -> None:
    add_model_args(p)
    add_recipe_args(p, default="w2a8kv4")
    p.add_argument("--out", required=True, metavar="DIR", help="package directory to write")
    p.add_argument("--stop-after", default=None, metavar="STEP",
                   help="end the flow after this step (load, compress, pack, write, ...); writes no package")
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
    if args.recipe_file or args.stop_after:
        raise AccllmError("--package recompiles the accelerator program only: --recipe-file and --stop-after "
                          "change the compression and need a full compile (without --package)")
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
    print(f"compiled {src} for {hw.name} into {out}{' (in place)' if same else ''} ({time.time() - t:.1f} s)")
    return 0
