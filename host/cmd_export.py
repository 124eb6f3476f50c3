"""``accllm export``: a package's weights as GGUF (llama.cpp) or a compressed-tensors directory (Hugging
Face transformers / vLLM); quant/export.py does the work, docs/export.md states the exactness."""
from __future__ import annotations

from algo.common import AccllmError

DESCRIPTION = """Export the weights of a compressed package for other runtimes.

  --format gguf                 one GGUF file for llama.cpp (architecture 'llama'): llama metadata,
                                llama.cpp tensor names, the package's tokenizer (GPT-2 BPE). A quantized
                                layer becomes Q8_0 (32 values per fp16 scale: d = the group's scale,
                                q = code - zero), bit-exact when the group is a multiple of 32 and every
                                code - zero fits int8 (always for W2/W3/W4; W8 often not); any other
                                tensor is F16 when its values are fp16 numbers, else F32 (exact), or F16
                                rounded with --inexact f16. Each tensor's type and exactness is measured
                                and listed.
  --format compressed-tensors   a Hugging Face directory (config.json with a compressed-tensors
                                'pack-quantized' quantization_config, model.safetensors, the tokenizer
                                files) that AutoModelForCausalLM.from_pretrained loads, dequantizing to
                                the package's weights exactly (float32 scales holding the fp16 values).
                                One scheme is packed (the decoder blocks'); a layer of another scheme
                                (e.g. a W8 lm_head) and float layers are stored dense, exactly.

The export carries weights only. llama.cpp and transformers will NOT reproduce the rest of the recipe:
8-bit activations (they compute in their own precision; llama.cpp's CPU kernels quantize activations
to their own 8-bit blocks), the 4-bit KV cache, Λ-shaped attention (they attend to every token) and
SpAtten token/head pruning. 2:4 sparsity is stored densely (pruned weights are zeros). Results from
those runtimes therefore match the package's fake-quant model with activation quantization off and full
attention, not the accelerator.

OUT is written to a temporary path beside it and renamed into place; an existing OUT is replaced only
when it is an earlier accllm export."""

EPILOG = """examples:
  accllm export --format gguf build/smollm2 smollm2.gguf
  accllm export --format compressed-tensors build/smollm2 smollm2-ct/
  accllm export --format gguf build/smollm2 smollm2.gguf --json"""


def add_arguments(p) -> None:
    p.add_argument("--format", required=True, metavar="FORMAT", help="gguf | compressed-tensors")
    p.add_argument("package", metavar="PACKAGE", help="package directory (written by compile-model)")
    p.add_argument("out", metavar="OUT", help="the GGUF file (gguf) or directory (compressed-tensors) to write")
    p.add_argument("--inexact", default="f32", metavar="f32|f16",
                   help="gguf: the type of a tensor that neither Q8_0 nor F16 holds exactly: f32 (exact, the "
                        "default) or f16 (rounded to nearest, smaller; listed as not exact)")
    p.add_argument("--scale-dtype", default="float32", metavar="float32|float16",
                   help="compressed-tensors: dtype of the stored scales: float32 (default: the dequantized "
                        "weights are exact in float32) or float16 (smaller; (q - zero)*scale then rounds to fp16)")
    p.add_argument("--json", action="store_true", help="print one JSON object (every tensor's type and "
                   "exactness) instead of a table")


def run(args) -> int:
    from quant import export
    fmt = args.format
    if fmt not in export.FORMATS:
        raise AccllmError(f"unknown export format {fmt!r}; choose one of {', '.join(export.FORMATS)}")
    if fmt == "gguf":
        if args.scale_dtype != "float32":
            raise AccllmError("--scale-dtype belongs to --format compressed-tensors")
        rep = export.export_gguf(args.package, args.out, inexact=args.inexact)
        rows = [(t["tensor"], t["type"] or "(tied)", t["exact"], t["note"]) for t in rep["tensors"]]
    else:
        if args.inexact != "f32":
            raise AccllmError("--inexact belongs to --format gguf")
        rep = export.export_compressed_tensors(args.package, args.out, scale_dtype=args.scale_dtype)
        rows = [(x["layer"], x["format"], x["exact"], x["note"]) for x in rep["layers"]]
    if args.json:
        from host.args import emit_json
        emit_json(args, rep)
        return 0
    print(f"{rep['out']}: {fmt}, {rep['bytes']:,} bytes, from {rep['package']}")
    if fmt == "gguf":
        tok = rep["tokenizer"]
        print(f"tokenizer: {tok['model']}" + (f" (pre {tok['pre']}, {tok['tokens']} tokens, {tok['merges']} merges)"
                                               if tok["model"] != "none" else "") +
              (f"; {tok['note']}" if tok.get("note") else ""))
    w, kw = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for name, kind, exact, note in rows:
        print(f"  {name:<{w}}  {kind:<{kw}}  {'exact' if exact else 'INEXACT'}  {note}")
    n_inexact = sum(not r[2] for r in rows)
    print("every tensor exact" if not n_inexact else f"{n_inexact} tensor(s) not exact")
    for item in rep["not_reproduced"]:
        print(f"not reproduced: {item}")
    return 0
