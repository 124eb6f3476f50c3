"""``accllm demo``: the main job on the embedded default model (what `make demo` runs)."""
from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

DESCRIPTION = """The main job, end to end, on the embedded default model (SmolLM2-135M):

  1. compile-model with the AccLLM recipe for the sim-small configuration (cached after the first time)
  2. perplexity on WikiText-2 test: fp vs the compressed package (cached per package)
  3. accllm run on the functional model (emu): streamed text, time to first token, tokens/s
  4. a few tokens on the RTL under Verilator (rtl) with the same host code: must match emu
  5. projections from the cycle model: bytes per token and U280 decode tokens/s for Llama-2-7B and
     SmolLM2 beside AccLLM (164 tokens/s) and FlightLLM (55 tokens/s), and the resource use of the
     u280 configuration (yosys synth_xilinx, cached)
and a summary table. Progress is shown on every long step."""
EPILOG = "example: accllm demo --rtl-tokens 2      (make demo runs `accllm demo`)"

ACCLLM_TPS, FLIGHTLLM_TPS = 164.0, 55.0


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model (default %(default)s)")
    p.add_argument("--recipe", default="accllm", help="recipe (default %(default)s)")
    p.add_argument("--hw", default="sim-small", help="hardware configuration the package is compiled for "
                   "(default %(default)s: small enough for the RTL simulation)")
    p.add_argument("--prompt", default="The capital of France is", help="prompt for the continuation")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--rtl-tokens", type=int, default=3, help="tokens generated on the RTL (0: skip rtl)")
    p.add_argument("--chunks", type=int, default=16, help="perplexity chunks of 1024 tokens (default 16)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows of WikiText-2 valid for "
                   "pruning and quantization (default %(default)s; compile-model's default is 64)")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration window (default "
                   "%(default)s; compile-model's default is 512)")
    p.add_argument("--out", default=None, metavar="DIR", help="package directory (default: in the cache)")
    p.add_argument("--rebuild", action="store_true", help="recompile the package even if cached")
    p.add_argument("--synth", action="store_true", help="also synthesize the u280 configuration with yosys for "
                   "the resource report (slow: tens of minutes on 2 cores; cached afterwards)")
    p.add_argument("--no-progress", action="store_true")


def _cli(argv: list[str], capture: bool = False):
    """Run an accllm subcommand in-process; AccllmError propagates. With capture: its stdout."""
    from algo.common import AccllmError
    from host import cli
    a = cli.build_parser().parse_args(argv)
    buf = io.StringIO()
    with (contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext()):
        rc = a._module.run(a)
    if rc:
        raise AccllmError(f"`accllm {' '.join(argv)}` failed (exit {rc})")
    return buf.getvalue() if capture else None


def _last_json(text: str) -> dict:
    """The JSON object a command printed with --json (one object, pretty-printed or on one line),
    after any progress lines."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        if line.strip().startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON object in the output")


def _fp_continuation(model: str, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation by the uncompressed model (transformers), the reference for the package's."""
    import torch
    from algo.models import load_model
    loaded = load_model(model)
    tok = loaded.tokenizer
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _step(i, n, what):
    print(f"[{i}/{n}] {what}", flush=True)


def run(args) -> int:
    from algo.common import AccllmError, atomic_write_text, cache_dir
    from algo.eval import format_table
    from sim.rtlsim.device import RtlUnsupported
    from host.runtime import open_runtime

    N = 6
    t_start = time.time()
    prog = [] if not args.no_progress else ["--no-progress"]
    pkg = Path(args.out) if args.out else cache_dir("demo") / f"{args.model}-{args.recipe}-{args.hw}"
    rows, failures = [], []

    # 1. compile (cached)
    t0 = time.time()
    cached = False
    if pkg.is_dir() and not args.rebuild:
        try:
            from host.runtime import load_package_verified
            m = load_package_verified(pkg).manifest
            from algo.recipe import load_recipe, recipe_from_dict
            want = load_recipe(args.recipe, sets=[f"calib_samples={args.calib_samples}",
                                                  f"calib_seqlen={args.calib_seqlen}"]).to_dict()
            # the whole recipe must match (a preset that changed since the package was built recompiles)
            # (keys added to the recipe after the package was built take their defaults)
            cached = m.get("hw", {}).get("name") == args.hw and recipe_from_dict(m.get("recipe", {})).to_dict() == want
            if not cached:
                print("    cached package was built for another hardware configuration or recipe; recompiling",
                      flush=True)
        except AccllmError as e:
            print(f"    cached package unusable ({e}); recompiling", flush=True)
    _step(1, N, f"compile-model --model {args.model} --recipe {args.recipe} --hw {args.hw} --out {pkg}"
          + ("  (cached)" if cached else ""))
    if not cached:
        from host import cli
        rc = cli.compile_model_main(["--model", args.model, "--recipe", args.recipe, "--hw", args.hw,
                                     "--set", f"calib_samples={args.calib_samples}",
                                     "--set", f"calib_seqlen={args.calib_seqlen}", "--out", str(pkg)] + prog)
        if rc:
            raise AccllmError(f"compile-model failed (exit {rc})")
    if cached:
        from hw.compiler import refresh_program
        from hw.config import load_hw
        refresh_program(pkg, load_hw(args.hw), log=lambda msg: print(f"    {msg}", flush=True))
    t_compile = time.time() - t0
    manifest = json.loads((pkg / "manifest.json").read_text())
    fp = manifest.get("footprint", {})

    # 2. perplexity fp vs compressed (cached per package)
    _step(2, N, f"perplexity on WikiText-2 test ({args.chunks} x 1024 tokens): fp and the package")
    t0 = time.time()
    ppl_cache = cache_dir("demo") / f"ppl-{args.model}-{args.chunks}-{manifest.get('files', {}).get('weights.safetensors', 'x')[:16]}.json"
    if ppl_cache.is_file() and not args.rebuild:
        ppl = json.loads(ppl_cache.read_text())
    else:
        ppl = {}
        ppl["fp"] = _last_json(_cli(["eval", "--model", args.model, "--recipe", "fp", "--chunks", str(args.chunks),
                                     "--json"] + prog, capture=True))["ppl"]
        ppl["package"] = _last_json(_cli(["eval", "--package", str(pkg), "--chunks", str(args.chunks), "--json"]
                                         + prog, capture=True))["ppl"]
        atomic_write_text(ppl_cache, json.dumps(ppl))
    t_ppl = time.time() - t0
    fp_text = _fp_continuation(args.model, args.prompt, args.max_new_tokens)
    print(f"    fp {args.model}: {args.prompt}{fp_text}".replace("\n", "\n    "), flush=True)

    # 3. emu
    _step(3, N, f"accllm run --backend emu --prompt {args.prompt!r} --max-new-tokens {args.max_new_tokens}")
    t0 = time.time()
    with open_runtime(pkg, "emu", owner="accllm demo") as rt:
        ids = rt.encode(args.prompt)
        emu_tokens, shown = [], ""
        sys.stdout.write("    " + args.prompt)
        for tok in rt.generate(ids, args.max_new_tokens):
            emu_tokens.append(tok)
            text = rt.decode(emu_tokens)
            sys.stdout.write(text[len(shown):].replace("\n", "\n    "))
            sys.stdout.flush()
            shown = text
        print()
        emu_stats = rt.stats
        rt_text = rt.decode(emu_tokens)
    t_emu = time.time() - t0

    # 4. rtl: a few tokens with the same host code
    rtl_row = "skipped (--rtl-tokens 0)"
    t_rtl = 0.0
    if args.rtl_tokens > 0:
        _step(4, N, f"accllm run --backend rtl (Verilator): {args.rtl_tokens} tokens, compared with emu")
        t0 = time.time()
        # the RTL run is cached by package, kernel sources, prompt and token count (it takes minutes)
        import hashlib
        from sim.rtlsim.device import _rtl_sources_digest
        key = hashlib.sha256(json.dumps([manifest.get("files", {}), _rtl_sources_digest(), ids, args.rtl_tokens],
                                        sort_keys=True).encode()).hexdigest()[:16]
        rtl_cache = cache_dir("demo") / f"rtl-{key}.json"
        try:
            if rtl_cache.is_file() and not args.rebuild:
                rec = json.loads(rtl_cache.read_text())
                rtl_tokens, cycles, clock, wall = rec["tokens"], rec["cycles"], rec["clock_mhz"], rec["wall_s"]
                print(f"    (cached result of the RTL run: {rtl_cache})", flush=True)
            else:
                with open_runtime(pkg, "rtl", owner="accllm demo") as rt:
                    rtl_tokens = []
                    for tok in rt.generate(ids, args.rtl_tokens):
                        rtl_tokens.append(tok)
                        print(f"    rtl token {len(rtl_tokens)}/{args.rtl_tokens}: {tok} "
                              f"({time.time() - t0:.0f} s)", flush=True)
                    cycles, clock = rt.stats.cycles, rt.device.hw.clock_mhz
                wall = time.time() - t0
                atomic_write_text(rtl_cache, json.dumps({"tokens": rtl_tokens, "cycles": cycles, "clock_mhz": clock,
                                                         "wall_s": wall}))
            want = emu_tokens[:len(rtl_tokens)]
            ok = rtl_tokens == want
            cyc = f"; {cycles} cycles = {cycles / (clock * 1e3):.2f} ms at {clock:g} MHz" if cycles else ""
            rtl_row = (f"{'MATCH' if ok else 'MISMATCH'}: rtl {rtl_tokens} vs emu {want}{cyc}; "
                       f"{wall:.0f} s wall")
            if not ok:
                failures.append("rtl tokens differ from emu")
        except RtlUnsupported as e:
            rtl_row = f"not run: {e}"
        except AccllmError as e:
            rtl_row = f"FAILED: {e}"
            failures.append("rtl run failed")
        t_rtl = time.time() - t0
    else:
        _step(4, N, "rtl skipped")

    # 5. projections from the cycle model
    _step(5, N, "cycle model: accllm perf for llama2-7b and the demo model on u280")
    proj = {}
    for model in ("llama2-7b", args.model):
        try:
            proj[model] = _last_json(_cli(["perf", "--model", model, "--hw", "u280", "--recipe", args.recipe,
                                           "--json"], capture=True))
        except (AccllmError, ValueError) as e:
            proj[model] = {"error": str(e)}

    # 6. resources of the u280 configuration: synthesis is opt-in (tens of minutes); otherwise the
    #    committed report of the last synthesis (hw/resources/u280.json), marked if the design changed
    from hw.build_rtl import known_resources
    from hw.config import load_hw
    from sim.rtlsim.device import _rtl_sources_digest
    rdir = cache_dir("demo") / f"synth-u280-{_rtl_sources_digest()}"

    def fmt_res(r):
        cap = r.get("capacity", {})
        return ", ".join(f"{k} {r[k]:,}" + (f" ({100 * r[k] / cap[k]:.1f}%)" if cap.get(k) else "")
                         for k in ("LUT", "FF", "DSP", "BRAM", "URAM") if k in r) + \
            f"; fits: {'yes' if r.get('fits') else 'NO'}" + \
            (f" (at most {r['max_ports_fitting']} of {r.get('weight_ports', '?')} weight ports would)"
             if not r.get("fits") and "max_ports_fitting" in r else "")
    res_row = ("not measured: `accllm demo --synth` or `accllm build-rtl --hw u280 --out DIR --synth` "
               "(yosys synthesis, tens of minutes)")
    if args.synth or (rdir / "resources.json").is_file():
        _step(6, N, "resources of the u280 configuration (build-rtl --synth; cached after the first time)")
        try:
            if not (rdir / "resources.json").is_file():
                _cli(["build-rtl", "--hw", "u280", "--out", str(rdir), "--synth"])
            res_row = fmt_res(json.loads((rdir / "resources.json").read_text())) + " (synthesized here)"
        except (AccllmError, OSError, ValueError) as e:
            res_row = f"not available: {e}"
    else:
        known = known_resources(load_hw("u280"))
        if known:
            r, current = known
            res_row = fmt_res(r) + (" (hw/resources/u280.json, synthesized from this design)" if current else
                                    " (hw/resources/u280.json, synthesized from an EARLIER version of the design; "
                                    "`accllm demo --synth` re-measures)")
        _step(6, N, "u280 resources: " + ("last synthesis report" if known else "not synthesized")
              + " (`--synth` runs yosys)")

    def tps(model):
        p = proj.get(model, {})
        if "error" in p:
            return f"not available: {p['error']}"
        ab = p.get("as_built") or {}
        return (f"target design {p.get('decode_tokens_per_s', float('nan')):.0f} tokens/s decode (unvalidated), "
                f"{p.get('bytes_per_token', 0) / 1e6:.1f} MB/token, roofline "
                f"{p.get('roofline_tokens_per_s', float('nan')):.0f} tokens/s; RTL as built "
                f"{ab.get('decode_tokens_per_s', float('nan')):.2f} tokens/s (validated model)")

    n_dec = max(emu_stats.new_tokens - 1, 0)
    rows += [
        ("model / recipe / hw", f"{args.model} / {args.recipe} / {args.hw}"),
        ("package", f"{pkg} ({'cached' if cached else f'compiled in {t_compile:.0f} s'})"),
        ("bits per weight", f"{fp.get('bits_per_weight_blocks', 'n/a')} (decoder blocks), "
                            f"{fp.get('bits_per_weight_linear', 'n/a')} (with lm_head), "
                            f"{fp.get('bits_per_weight_total', 'n/a')} (every stored tensor)"),
        ("perplexity fp -> package", f"{ppl['fp']:.3f} -> {ppl['package']:.3f}  (WikiText-2 test, "
                                     f"{args.chunks} x 1024)"),
        ("fp continuation", repr(args.prompt + fp_text)),
        ("package on emu", repr(args.prompt + rt_text)),
        ("emu", f"{len(emu_tokens)} tokens; TTFT {emu_stats.ttft_s:.2f} s, decode "
                f"{emu_stats.decode_tokens_per_s:.2f} tokens/s (wall, {n_dec} steps)"),
        ("rtl vs emu", rtl_row),
        ("U280 Llama-2-7B (cycle model)", tps("llama2-7b") + f"; AccLLM {ACCLLM_TPS:.0f}, FlightLLM {FLIGHTLLM_TPS:.0f}"),
        (f"U280 {args.model} (cycle model)", tps(args.model)),
        ("U280 resources", res_row),
        ("time: compile/ppl/emu/rtl/total", f"{t_compile:.0f} / {t_ppl:.0f} / {t_emu:.0f} / {t_rtl:.0f} / "
                                            f"{time.time() - t_start:.0f} s"),
    ]
    print()
    print(format_table(rows))
    if failures:
        print(f"demo FAILED: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0
