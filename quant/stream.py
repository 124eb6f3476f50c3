"""Block-streamed compression: the recipe pipeline run one decoder block at a time, for models whose
float weights do not fit in memory (``compile-model --stream-blocks``, docs/scale.md).

The whole-model pipeline (quant.pipeline) runs each step over every block before the next step starts.
Every step is already sequential over the blocks — block l is calibrated on the outputs of blocks
0..l-1 after that step — so the steps can as well be interleaved: for block l, load its weights
(algo.models.load_block, from the memory-mapped safetensors shards), prune it (algo.prune.LayerPruner),
calibrate its KV-cache constants (quant.kv.LayerKVCalibrator), quantize and block-tune it
(quant.quantize.LayerQuantizer), pack its tensors (quant.package.Packer) and drop it
(algo.models.release_block). What moves from one block to the next is each step's calibration stream
(hidden states on the calibration windows, as the whole-model step holds them), so every block gets
exactly the inputs it gets in the whole-model pipeline and the package has the same bytes.

Memory: one float32 block, its Hessians and work, the calibration streams (prune: calib_samples ×
calib_seqlen × hidden float32; quantize: two of those with block tuning; KV: up to 8192 tokens), the
embedding, final norm and lm_head, and the packed tensors of the blocks done.

Resume: with a *progress* directory, after each block its packed tensors go to ``block_NNNN.safetensors``
and the streams, reports and RNG state to ``state.pt`` (temporary name, then renamed); a later run with
the same directory continues after the last block saved, with the same result as an uninterrupted run.

Not streamed (refused): outlier smoothing (smooth_alpha) and QAT (qat_steps), which need the whole model.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from algo.common import AccllmError

from .package import Packer, save_weights


def check_streamable(recipe) -> None:
    if recipe.smooth_alpha > 0:
        raise AccllmError(f"smooth_alpha={recipe.smooth_alpha}: outlier smoothing calibrates on the whole float "
                          "model and cannot be block-streamed; compile without --stream-blocks (or with "
                          "--stream-blocks off) or set smooth_alpha=0")
    if recipe.qat_steps > 0:
        raise AccllmError(f"qat_steps={recipe.qat_steps}: QAT trains the whole model and cannot be block-streamed; "
                          "compile without --stream-blocks (or with --stream-blocks off) or set qat_steps=0")


def _block_file(progress: Path, li: int) -> Path:
    return progress / f"block_{li:04d}.safetensors"


def compress_streamed(prepared, calib, progress: bool = True, progress_dir: Path | None = None,
                      on_block=None) -> tuple[dict, dict, dict, dict]:
    """Compress and pack *prepared*'s model (loaded by algo.models.load_model_streamed) block by block.
    Returns what :func:`quant.package.package_tensors` returns for the compressed model; the steps'
    reports go to ``prepared.report["steps"]`` as the whole-model pipeline writes them. *on_block(li)*
    is called after block li is packed (and saved)."""
    from algo.models import load_block, release_block
    from .pipeline import COMPRESS_STEPS
    recipe = prepared.recipe
    check_streamable(recipe)
    model = prepared.loaded.model
    L = model.config.num_hidden_layers
    steps = [s.name for s in COMPRESS_STEPS if s.applies(recipe)]
    seconds = {s: 0.0 for s in steps}
    data = calib()

    def timed(name, fn, *a):
        t = time.time()
        out = fn(*a)
        seconds[name] += time.time() - t
        return out

    pruner = kv = quantizer = None
    if "prune" in steps:
        from algo.prune import LayerPruner
        from .blocktune import tune_block
        from .pipeline import prune_calibration
        pruner = LayerPruner(model, recipe, prune_calibration(recipe, calib), progress=False, tune_block=tune_block)
        timed("prune", pruner.start)
    if "kv-calibrate" in steps:
        from .kv import LayerKVCalibrator
        kv = LayerKVCalibrator(model, recipe, data)
        timed("kv-calibrate", kv.start)
    attention_info = None
    if "attention" in steps:
        attention_info = timed("attention", next(s for s in COMPRESS_STEPS if s.name == "attention").fn,
                               prepared, calib, False)
    if "quantize" in steps:
        from .quantize import LayerQuantizer
        quantizer = LayerQuantizer(model, recipe, data, progress=False)
        timed("quantize", quantizer.start)
    packer = Packer(bool(getattr(model.config, "tie_word_embeddings", False)))
    packer.add_float("model.embed_tokens.weight", model.model.embed_tokens.weight)

    first = 0
    state_file = progress_dir / "state.pt" if progress_dir is not None else None
    if state_file is not None and state_file.is_file():
        # our own file, written below: tensors and plain containers, but kwargs need the full unpickler
        st = torch.load(state_file, weights_only=False)
        first = st["next"]
        for obj, key in ((pruner, "pruner"), (kv, "kv"), (quantizer, "quantize")):
            if obj is not None:
                obj.set_state(st[key])
        packer.meta, packer.layers, packer.counts = st["packer"]
        from safetensors.torch import load_file
        for li in range(first):
            packer.tensors.update(load_file(str(_block_file(progress_dir, li))))
        seconds.update(st["seconds"])
        torch.set_rng_state(st["rng"])
        if progress:
            print(f"blocks: continuing after block {first - 1} (saved in {progress_dir})", file=sys.stderr, flush=True)
    elif progress_dir is not None:
        progress_dir.mkdir(parents=True, exist_ok=True)

    t_blocks = time.time()
    for li in range(first, L):
        t = time.time()
        load_block(model, li)
        seconds["load"] = seconds.get("load", 0.0) + time.time() - t
        if pruner is not None:
            timed("prune", pruner.layer, li)
        if kv is not None:
            timed("kv-calibrate", kv.layer, li)
        block = model.model.layers[li]
        prefix = f"model.layers.{li}"
        if quantizer is not None:
            from .quantize import _finish_act
            timed("quantize", quantizer.layer, li)
            _finish_act(block, recipe, quantizer.absmax_all, prefix=prefix)
        before = set(packer.tensors)
        for n, p in block.named_parameters():
            packer.add_float(f"{prefix}.{n}", p)
        for n, m in block.named_modules():
            if n:
                packer.add_linear(f"{prefix}.{n}", m)
        release_block(model, li)
        _return_freed_memory()
        if progress_dir is not None:
            mine = {n: packer.tensors[n] for n in packer.tensors if n not in before}
            _save_progress(progress_dir, li, mine, {
                "next": li + 1, "pruner": pruner.state() if pruner else None, "kv": kv.state() if kv else None,
                "quantize": quantizer.state() if quantizer else None,
                "packer": (packer.meta, packer.layers, packer.counts), "seconds": seconds,
                "rng": torch.get_rng_state()})
        if progress:
            done = li + 1 - first
            eta = (time.time() - t_blocks) / done * (L - li - 1)
            print(f"[blocks] block {li + 1}/{L} in {time.time() - t:.1f} s (about {eta:.0f} s left), "
                  f"peak RSS {_peak_rss_mb():.0f} MB", file=sys.stderr, flush=True)
        if on_block is not None:
            on_block(li)

    report = prepared.report.setdefault("steps", {})
    results = {}
    if pruner is not None:
        results["prune"] = timed("prune", pruner.finish)
    if kv is not None:
        results["kv-calibrate"] = {"bits": recipe.kv_bits, "group": recipe.kv_group_size}
    if attention_info is not None:
        results["attention"] = attention_info
    if quantizer is not None:
        from .quantize import _finish_act
        timed("quantize", quantizer.finish_lm_head)
        _finish_act(model.lm_head, recipe, quantizer.absmax_all, prefix="lm_head")
        results["quantize"] = quantizer.finish()
    for name in steps:                      # the order and shape of the whole-model pipeline's report
        rec = {"seconds": round(seconds[name], 3)}
        rec.update(results.get(name) or {})
        report[name] = rec
    packer.add_float("model.norm.weight", model.model.norm.weight)
    packer.add_linear("lm_head", model.lm_head)
    if kv is not None:
        packer.add_kv(kv.hook.constants())
    return packer.result()


def _return_freed_memory() -> None:
    """Free the dropped block now and give the allocator's free pages back to the system (glibc keeps
    freed heap pages, so without it the resident size grows by hundreds of MB per 7B block)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):         # not glibc: nothing to trim
        pass


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _save_progress(d: Path, li: int, tensors: dict, state: dict) -> None:
    f = _block_file(d, li)
    tmp = f.with_name(f".{f.name}.tmp")
    save_weights(tensors, tmp)
    os.replace(tmp, f)
    tmp = d / ".state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, d / "state.pt")


def save_packed(d: Path, packed: tuple[dict, dict, dict, dict], report: dict) -> None:
    """The result of :func:`compress_streamed` as a build-step artefact (``packed.safetensors`` and
    ``packed.json``)."""
    tensors, meta, layers, footprint = packed
    save_weights(tensors, d / "packed.safetensors")
    (d / "packed.json").write_text(json.dumps({"meta": meta, "layers": layers, "footprint": footprint,
                                               "report": report}))


def load_packed(d: Path) -> tuple[tuple[dict, dict, dict, dict], dict]:
    from safetensors.torch import load_file
    info = json.loads((d / "packed.json").read_text())
    tensors = load_file(str(d / "packed.safetensors"))
    tensors = {n: tensors[n] for n in info["meta"]}
    return (tensors, info["meta"], info["layers"], info["footprint"]), info["report"]
