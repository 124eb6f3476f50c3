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
    add_progress_args(p)


def run(args) -> int:
    from quant.build import compile_model
    return compile_model(args)
