"""``accllm bench soak``: a long decode on the functional model with a small Λ window, so that the KV ring
buffer wraps many times; memory and cycles per token must stay flat and the tokens must be the torch
fake-quant model's.

The decode is ``accllm run --backend emu``'s: ``Runtime.generate`` (greedy, the device's argmax) on a
package compiled for the hardware configuration. (Sampling is not offered: on a random-init model the
distribution is nearly flat over the vocabulary, and the emu's and torch's logits, close but not equal,
then draw different tokens from the same seed at almost half of the steps (measured over 2,000 steps);
greedy tokens are comparable.) Before the measured blocks, the ring is filled (the
prompt plus warm-up decode steps up to sink + window positions), so every measured step attends to the
same number of keys. Per block of ``--block`` tokens: wall time, resident memory (RSS) at the block's
end and the device's cycles per token (sim/emu.py's cycle count, what ``accllm run`` reports).

Checks: the last block's RSS within RSS_TOLERANCE_MB of the first block's; the last block's cycles per
token within CYCLES_TOLERANCE (relative) of the first block's; and the reference: the fake-quant torch
model of the same package (quant.package, its Λ KV cache) fed the prompt and the emu's tokens (teacher
forcing: one forward per token, so a disagreement does not hide the rest), whose argmax must equal the
emu's next token at every step, except at near-ties: steps where torch's logit of the emu's token is
within NEAR_TIE_LOGIT of its largest (the two pipelines' logits are close, not equal: the integer
numerics of hw/numerics.py against float fake-quant), listed in the result with their gap.
"""
from __future__ import annotations

import os
import sys
import time

from algo.common import AccllmError

RSS_TOLERANCE_MB = 16.0           # last block vs first block, resident memory
# a step where torch's argmax is another token than the emu's counts as a near-tie when torch's logit of
# the emu's token is within this of torch's largest logit: the integer pipeline and the float fake-quant
# model differ by up to 0.018 in the logits of tiny (measured over 62 steps, 2026-12-03)
NEAR_TIE_LOGIT = 0.05
CYCLES_TOLERANCE = 0.001          # last block vs first block, relative, cycles per decode token
DEFAULT_SINK, DEFAULT_WINDOW = 4, 60


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _reference(pkg_dir, prompt: list[int], tokens: list[int], n: int, progress: bool) -> dict:
    """The fake-quant torch model fed *prompt* then tokens[:n-1]: its argmax after each, against tokens[:n]."""
    import torch
    from algo.eval import HFScorer
    from host.runtime import Sampler, Sampling
    from quant.package import load_package
    greedy = Sampler(Sampling())            # the runtime's greedy choice (first maximum, as the device's argmax)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # a tiny model: more threads only add waiting (measured 10x on 2 cores)
    try:
        pkg = load_package(pkg_dir)
        model = pkg.to_torch_model()
        sc = HFScorer(model, cache_factory=pkg.cache_factory(model), name="fake-quant")
        s = sc.new_session()
        t0 = time.perf_counter()
        logits = sc.forward(s, torch.tensor(prompt))
        agree, first_bad, bad, ties = 0, None, 0, []
        step = max(1, n // 10)
        for i in range(n):
            if i:
                logits = sc.forward(s, torch.tensor([tokens[i - 1]]))
            row = logits[-1].numpy()
            ref = greedy(row)
            if ref == tokens[i]:
                agree += 1
            elif float(row[ref] - row[tokens[i]]) <= NEAR_TIE_LOGIT:
                ties.append({"step": i, "logit_gap": round(float(row[ref] - row[tokens[i]]), 5)})
            else:
                bad += 1
                first_bad = i if first_bad is None else first_bad
            if (i + 1) % step == 0 or i + 1 == n:
                _log(progress, f"  reference: {i + 1}/{n} tokens, {len(ties)} near-ties, {bad} disagreeing "
                               f"({(i + 1) / (time.perf_counter() - t0):.1f} tokens/s)")
    finally:
        torch.set_num_threads(threads)
    return {"tokens_compared": n, "tokens_agreeing": agree, "near_ties": ties, "tokens_disagreeing": bad,
            "first_disagreement": first_bad, "near_tie_logit": NEAR_TIE_LOGIT,
            "seconds": round(time.perf_counter() - t0, 1)}


def bench_soak(args) -> dict:
    import json
    from pathlib import Path

    import numpy as np

    from host.runtime import open_runtime
    progress = not getattr(args, "no_progress", False)
    if args.tokens is None:
        args.tokens = 20000
    if args.prompt_tokens is None:
        args.prompt_tokens = 16
    block = args.block or max(1, args.tokens // 20)
    if args.tokens < 2 or args.prompt_tokens < 1 or block < 1 or block > args.tokens:
        raise AccllmError("bench soak: --tokens must be at least 2, --prompt-tokens at least 1 and --block "
                          "between 1 and --tokens")
    if args.reference_tokens is not None and args.reference_tokens < 0:
        raise AccllmError(f"bench soak: --reference-tokens must be >= 0, got {args.reference_tokens}")
    if args.package:
        if args.sink is not None or args.window is not None:
            raise AccllmError("bench soak: --sink and --window choose the package compiled for the soak; a "
                              "--package has its own")
        pkg = Path(args.package)
        if args.model is None:
            mf = pkg / "manifest.json"
            args.model = json.loads(mf.read_text()).get("source", {}).get("spec") if mf.is_file() else None
    else:
        from host.cmd_bench import _cached_package
        args.model = args.model or "tiny"
        sink = DEFAULT_SINK if args.sink is None else args.sink
        window = DEFAULT_WINDOW if args.window is None else args.window
        # a random-init or small model: the calibration set only needs to exercise the steps
        pkg = _cached_package(args.model, args.recipe, args.hw,
                              sets=[f"sink_tokens={sink}", f"window={window}", "calib_samples=4",
                                    "calib_seqlen=128", "block_tune_steps=8"])
    rt = open_runtime(pkg, "emu", owner="accllm bench soak")
    try:
        att = rt.proto.raw.get("attention", {})
        if rt.proto.attention != "lambda":
            raise AccllmError(f"bench soak needs a package with Λ-shaped attention (its KV ring must wrap); "
                              f"{pkg} has {rt.proto.attention} attention")
        sink, window = int(att["sink"]), int(att["window"])
        warmup = max(1, sink + window - args.prompt_tokens)     # decode steps that fill the ring
        wraps = (args.prompt_tokens + warmup + args.tokens - sink) / window
        if args.tokens < 2 * window:
            raise AccllmError(f"bench soak: --tokens {args.tokens} is not much more than the window ({window} "
                              "tokens): the ring would not wrap; give more tokens or a smaller --window")
        rng = np.random.default_rng(0)
        V = rt.proto.vocab_size
        prompt = [int(x) for x in rng.integers(100, min(V, 20000), args.prompt_tokens)]
        _log(progress, f"soak: {pkg} on emu ({rt.device.hw.name}), Λ sink {sink} + window {window}: prompt "
                       f"{len(prompt)}, {warmup} warm-up and {args.tokens} decode steps in blocks of {block} "
                       f"(the ring wraps {wraps:.0f} times)")
        t_start = time.perf_counter()
        gen = rt.generate(prompt, 1 + warmup + args.tokens, stop_at_eos=False)
        tokens = [next(gen) for _ in range(1 + warmup)]        # prefill's token, then the warm-up steps
        blocks = []
        done = 0
        while done < args.tokens:
            n = min(block, args.tokens - done)
            c0, t0 = rt.stats.cycles, time.perf_counter()
            for _ in range(n):
                tokens.append(next(gen))
            dt = time.perf_counter() - t0
            cyc = None if c0 is None or rt.stats.cycles is None else (rt.stats.cycles - c0) / n
            blocks.append({"block": len(blocks), "first_token": done, "tokens": n, "seconds": round(dt, 3),
                           "tokens_per_s": round(n / dt, 2), "rss_mb": round(rss_mb(), 1),
                           "cycles_per_token": None if cyc is None else round(cyc, 2)})
            done += n
            b = blocks[-1]
            _log(progress, f"  block {b['block'] + 1}/{-(-args.tokens // block)}: tokens {done}/{args.tokens}, "
                           f"{b['tokens_per_s']:.1f} tokens/s, RSS {b['rss_mb']:.1f} MB, "
                           f"{b['cycles_per_token']} cycles/token")
        gen.close()
        decode_s = time.perf_counter() - t_start
        hw = rt.device.hw
    finally:
        rt.close()
    ref_n = len(tokens) if args.reference_tokens is None else min(args.reference_tokens, len(tokens))
    ref = None
    if ref_n > 0:
        _log(progress, f"reference: the fake-quant torch model on the prompt and the first {ref_n} emu tokens")
        ref = _reference(pkg, prompt, tokens, ref_n, progress)
    first, last = blocks[0], blocks[-1]
    rss_growth = last["rss_mb"] - first["rss_mb"]
    cyc_ratio = (None if first["cycles_per_token"] in (None, 0) or last["cycles_per_token"] is None
                 else last["cycles_per_token"] / first["cycles_per_token"])
    rss_flat = rss_growth <= RSS_TOLERANCE_MB
    cycles_flat = cyc_ratio is not None and abs(cyc_ratio - 1) <= CYCLES_TOLERANCE
    tokens_ok = ref is None or ref["tokens_disagreeing"] == 0
    return {"backend": "soak", "device": "emu", "model": args.model, "package": str(pkg), "hw": hw.name,
            "sink": sink, "window": window, "prompt_tokens": len(prompt), "warmup_tokens": warmup,
            "decode_tokens": args.tokens, "block_tokens": block, "ring_wraps": round(wraps, 1),
            "decode_seconds": round(decode_s, 1), "decode_tokens_per_s": round((warmup + args.tokens) / decode_s, 2),
            "rss_mb_first": first["rss_mb"], "rss_mb_last": last["rss_mb"], "rss_growth_mb": round(rss_growth, 1),
            "rss_tolerance_mb": RSS_TOLERANCE_MB, "rss_flat": rss_flat,
            "cycles_per_token_first": first["cycles_per_token"], "cycles_per_token_last": last["cycles_per_token"],
            "cycles_ratio_last_first": None if cyc_ratio is None else round(cyc_ratio, 6),
            "cycles_tolerance": CYCLES_TOLERANCE, "cycles_flat": cycles_flat,
            "reference": ref, "tokens_match_reference": tokens_ok if ref is not None else None,
            "distinct_tokens": len(set(tokens)), "passed": rss_flat and cycles_flat and tokens_ok,
            "blocks": blocks,
            "note": ("blocks start once the ring is full (prompt + warm-up = sink + window positions); rss_mb: "
                     "resident memory at the end of the block; cycles_per_token: the functional model's cycle "
                     "count per decode step; reference: the fake-quant torch model fed the prompt and the emu "
                     "tokens, its argmax compared with the emu's next token at every step; near_ties: steps where "
                     "they differ but torch's logit of the emu's token is within near_tie_logit of its largest "
                     "(not counted as disagreeing); distinct_tokens: how varied the generated tokens are")}


def _ties(ties: list, shown: int = 5) -> str:
    text = ", ".join("step {step}: gap {logit_gap}".format(**t) for t in ties[:shown])
    return text + (f", ... ({len(ties)} in all)" if len(ties) > shown else "") if ties else "none"


def print_summary(res: dict) -> None:
    """The blocks as a table, then the checks."""
    print(f"{'block':>5} {'tokens':>13} {'tokens/s':>9} {'RSS MB':>8} {'cycles/token':>13}")
    for b in res["blocks"]:
        print(f"{b['block'] + 1:>5} {b['first_token']:>6}-{b['first_token'] + b['tokens']:<6} {b['tokens_per_s']:>9.1f} "
              f"{b['rss_mb']:>8.1f} {b['cycles_per_token']!s:>13}")
    ref = res["reference"]
    rows = [("package", f"{res['package']} ({res['model']}, {res['hw']}, sink {res['sink']} + window {res['window']})"),
            ("decode", f"{res['warmup_tokens']} warm-up + {res['decode_tokens']} tokens in {res['decode_seconds']} s "
                       f"({res['decode_tokens_per_s']} tokens/s); the ring wrapped {res['ring_wraps']:.0f} times"),
            ("RSS", f"{res['rss_mb_first']} -> {res['rss_mb_last']} MB (growth {res['rss_growth_mb']} MB, "
                    f"tolerance {res['rss_tolerance_mb']} MB): {'flat' if res['rss_flat'] else 'NOT flat'}"),
            ("cycles/token", f"{res['cycles_per_token_first']} -> {res['cycles_per_token_last']} (ratio "
                             f"{res['cycles_ratio_last_first']}, tolerance {res['cycles_tolerance']}): "
                             f"{'flat' if res['cycles_flat'] else 'NOT flat'}"),
            ("fake-quant reference", "not run" if ref is None else
             f"{ref['tokens_agreeing']}/{ref['tokens_compared']} tokens agree, {len(ref['near_ties'])} near-ties "
             f"({_ties(ref['near_ties'])}), "
             f"{ref['tokens_disagreeing']} disagree"
             + ("" if ref["first_disagreement"] is None else f", the first at {ref['first_disagreement']}")
             + f" ({ref['seconds']} s)"),
            ("result", "passed" if res["passed"] else "FAILED")]
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
