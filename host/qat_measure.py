"""Measure quantization-aware distillation (QAT) on top of PTQ: perplexity before and after.

    .venv/bin/python -m host.qat_measure --model smollm2-135m --recipe w2 --steps 2000 --json
    .venv/bin/python -m host.qat_measure --recipe w2a8kv4 --steps 2000 --batch 8 --seqlen 1024 \\
        --train-samples 2048 --out build/smollm2-w2a8kv4-qat

Loads the model, applies the recipe's PTQ (quant.pipeline.prepare with qat_steps=0), evaluates
(WikiText-2 test, --ctx x --chunks), then distils the float model into the quantized one for --steps
steps on WikiText-2 *valid* windows (quant.qat.distill; CUDA when available) and evaluates again.
With --out the distilled model is also written as a package (same format as compile-model).
Prints a summary table (or --json): ppl, ratio to fp, time of each phase, device, KL curve.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m host.qat_measure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w2")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=2e-5, help="latent weight learning rate (AdamW)")
    p.add_argument("--scale-lr", type=float, default=1e-4, help="scale learning rate")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--train-samples", type=int, default=512, help="WikiText-2 valid windows to train on")
    p.add_argument("--init", choices=("fp", "ptq"), default="fp")
    p.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--fp-ppl", type=float, default=19.887, help="fp perplexity for the ratio")
    p.add_argument("--out", default=None, help="also write the distilled model as a package here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import torch
    from algo.common import AccllmError
    from algo.data import calibration_batches, load_tokens
    from algo.eval import format_table, perplexity_chunks
    from algo.models import load_model
    from algo.recipe import load_recipe
    from quant.pipeline import prepare
    from quant.qat import distill

    try:
        recipe = load_recipe(args.recipe, None, list(args.sets) + ["qat_steps=0"])
        progress = not args.no_progress
        t0 = time.time()
        loaded = load_model(args.model)
        teacher = copy.deepcopy(loaded.model)
        tokens = load_tokens("wikitext2", loaded.tokenizer, args.ctx * args.chunks)
        prepared = prepare(loaded, recipe, progress=progress)
        t_ptq = time.time() - t0
        ppl_ptq = perplexity_chunks(prepared.scorer(), tokens, args.ctx, args.chunks, progress=progress)["ppl"]
        train = calibration_batches(loaded.tokenizer, args.train_samples, args.seqlen, recipe.seed + 7)
        recipe.qat_steps = args.steps
        t1 = time.time()
        rep = distill(loaded.model, recipe, train, teacher=teacher, progress=progress, device=args.device,
                      lr=args.lr, scale_lr=args.scale_lr, batch=args.batch, init=args.init)
        t_qat = time.time() - t1
        del teacher
        ppl_qat = perplexity_chunks(prepared.scorer(), tokens, args.ctx, args.chunks, progress=progress)["ppl"]
        if args.out:
            from argparse import Namespace
            from host.build import BuildContext, step_finalize, step_pack, step_write
            from algo.common import atomic_directory
            ctx = BuildContext(args=Namespace(model=args.model), recipe=recipe, loaded=loaded, prepared=prepared)
            prepared.report.setdefault("qat", rep)
            with atomic_directory(args.out) as tmp:
                ctx.tmp = tmp
                for fn in (step_pack, step_write, step_finalize):
                    fn(ctx)
    except AccllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {"model": args.model, "recipe": recipe.to_dict(), "ppl_ptq": ppl_ptq, "ratio_ptq": ppl_ptq / args.fp_ppl,
           "ppl_qat": ppl_qat, "ratio_qat": ppl_qat / args.fp_ppl, "ptq_seconds": round(t_ptq, 1),
           "qat_seconds": round(t_qat, 1), "qat": rep, "device": rep["device"],
           "cuda_peak_mb": (torch.cuda.max_memory_allocated() / 2 ** 20) if torch.cuda.is_available() else None}
    if args.json:
        print(json.dumps(res))
    else:
        print(format_table([("model / recipe", f"{args.model} / {recipe.name}: {recipe.summary()}"),
                            ("PTQ ppl (ratio)", f"{ppl_ptq:.3f} ({ppl_ptq / args.fp_ppl:.3f})"),
                            (f"QAT {args.steps} steps ppl (ratio)", f"{ppl_qat:.3f} ({ppl_qat / args.fp_ppl:.3f})"),
                            ("PTQ time", f"{t_ptq:.1f} s"), ("QAT time", f"{t_qat:.1f} s on {rep['device']}"),
                            ("KL first / last 10", f"{rep['kl_first']:.4f} / {rep['kl_last_10']:.4f}")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
