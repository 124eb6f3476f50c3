"""``accllm bench BACKEND``: benchmark a device backend (``emu``: functional-model decode speed; ``rtl``: the RTL kernel;
``soak``: a long functional-model decode through many wraps of the Λ KV ring, host/bench_soak.py).

Adding a backend: put ``"rtl": "module:function"`` into BACKENDS (function(args) -> dict, printed as
JSON with --json; host.cli keeps everything else the benchmark writes, simulators included, off stdout;
without --json the module's ``print_summary(result)`` prints it, if the module has one) and, if it needs options of its own, add them in ``add_arguments`` (they are shared
by every backend, so give them backend-neutral names or document which backend reads them)."""
from __future__ import annotations

import json
import time

from algo.common import AccllmError

DESCRIPTION = """Benchmark a backend of the accelerator.

emu: decode speed of the functional model (sim/emu.py) on this machine: compiles the model for the
hardware configuration (cached in the accllm cache, keyed by model, recipe and configuration; or
--package DIR), prefills a prompt, then times --tokens decode steps.

rtl with --model or --package: the whole model on the RTL kernel (Verilator): prefill a prompt, then
--tokens decode steps; cycles per decode token measured by the kernel's cycle register against the
cycle model's prediction for the same runs (sim/cycle.py, through the functional model), tokens
compared with emu, and the simulation speed in cycles per second.
rtl without --model: the weight-stream efficiency of one large MATMUL and of the DMA.

compile-7b --out DIR: a random-weight model of Llama-2-7B's shape (sharded fp16 safetensors, written once
into the accllm cache) compiled with the accllm recipe for u280, block-streamed (compile-model
--stream-blocks on), GPTQ / SparseGPT / block tuning replaced by RTN / magnitude pruning / none (hours on
2 cores otherwise); time and peak RSS per build step; the package is then loaded, read by `accllm perf
--package` and run for --tokens (default 3) tokens on emu. --layers / --hidden scale the model down.

soak: --tokens decode steps (default 20000) on the functional model, as `accllm run --backend emu` does,
with a package whose Λ window (--sink + --window, default 4 + 60; compiled once for tiny and cached) is
much smaller, so the KV ring wraps hundreds of times. Per --block of tokens: RSS and cycles per token,
which must stay flat (last block vs first); every token is checked against the fake-quant torch model
of the same package (--reference-tokens: only that many). Exit status 1 when a check fails."""
EPILOG = ("examples: accllm bench emu --model smollm2-135m --json\n"
          "          accllm bench rtl --hw sim-small --model tiny --json\n"
          "          accllm bench soak --tokens 20000 --json\n"
          "          accllm bench compile-7b --out build/llama2-7b-shape --json")

BACKENDS: dict[str, str] = {"emu": "host.cmd_bench:_bench_emu",   # backend -> "module:function(args)->dict"
                            "rtl": "host.cmd_bench:_bench_rtl",    # reads --hw (RTL kernel on Verilator)
                            "soak": "host.bench_soak:bench_soak",  # reads --block, --sink, --window, --reference-tokens
                            "compile-7b": "host.bench_compile:bench_compile_7b"}  # reads --out, --layers, --hidden, --tokens


def add_arguments(p) -> None:
    p.add_argument("backend", help="backend to benchmark: " + " | ".join(BACKENDS))
    p.add_argument("--model", default=None, help="model (emu: default smollm2-135m; rtl: runs the whole model "
                   "when given; soak: default tiny)")
    p.add_argument("--recipe", default="accllm", help="recipe for the cached package (default accllm)")
    p.add_argument("--hw", default="sim-small", help="hardware configuration (default sim-small)")
    p.add_argument("--package", default=None, metavar="DIR", help="use this compiled package instead")
    p.add_argument("--tokens", type=int, default=None, help="decode steps to time (default 32 on emu, 16 on rtl, "
                   "20000 on soak; compile-7b: tokens generated on emu from the package, default 3)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length before decoding (default 16 on emu "
                   "and soak, 8 on rtl)")
    p.add_argument("--block", type=int, default=None, help="soak: tokens per reported block (default --tokens / 20)")
    p.add_argument("--sink", type=int, default=None, help="soak: Λ sink tokens of the package compiled for it (default 4)")
    p.add_argument("--window", type=int, default=None, help="soak: Λ window of the package compiled for it "
                   "(default 60)")
    p.add_argument("--reference-tokens", type=int, default=None, metavar="N",
                   help="soak: compare only the first N tokens with the fake-quant torch model (default all; 0: none)")
    p.add_argument("--out", default=None, metavar="DIR", help="compile-7b: the package directory to write")
    p.add_argument("--layers", type=int, default=None, help="compile-7b: decoder layers of the random model "
                   "(default 32, Llama-2-7B's; fewer for a quick check)")
    p.add_argument("--hidden", type=int, default=None, help="compile-7b: hidden size (default 4096; a multiple of "
                   "128, heads = hidden / 128, intermediate scaled as Llama-2-7B's; smaller for a quick check)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines (soak, compile-7b)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _cached_package(model: str, recipe: str, hw: str, sets: list[str] = ()):
    import hashlib
    import subprocess
    import sys
    from pathlib import Path
    from algo.common import cache_dir
    from algo.models import load_model  # noqa: F401  (validates the name early below)
    key = hashlib.sha256(f"{model}|{recipe}|{hw}".encode() + "".join(f"|{s}" for s in sets).encode()).hexdigest()[:16]
    d = Path(cache_dir("bench")) / f"{Path(model).name}-{recipe}-{hw}-{key}"
    usable = (d / "memmap.json").is_file()
    if usable:
        from quant.package import read_manifest
        try:
            read_manifest(d)
        except AccllmError as e:
            print(f"the cached package {d} is unusable ({e}); compiling it again", file=sys.stderr)
            usable = False
    if not usable:
        print(f"compiling {model} ({recipe}) for {hw} into {d} (once) ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-c", "import sys; from host.cli import compile_model_main; "
                            "sys.exit(compile_model_main(sys.argv[1:]))", "--model", model, "--recipe", recipe,
                            "--hw", hw, "--out", str(d), *[x for s in sets for x in ("--set", s)]])
        if r.returncode != 0:
            raise AccllmError(f"compiling {model} for the benchmark failed (exit {r.returncode})")
    else:
        from hw.compiler import refresh_program
        from hw.config import load_hw
        refresh_program(d, load_hw(hw), log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return d


def _defaults(args, model, tokens, prompt_tokens):
    if args.package and args.model is None:       # report the model the package was compiled from
        from pathlib import Path
        mf = Path(args.package) / "manifest.json"
        args.model = json.loads(mf.read_text()).get("source", {}).get("spec") if mf.is_file() else None
    args.model = args.model or model
    args.tokens = tokens if args.tokens is None else args.tokens
    args.prompt_tokens = prompt_tokens if args.prompt_tokens is None else args.prompt_tokens
    if args.tokens < 1 or args.prompt_tokens < 1:
        raise AccllmError("--tokens and --prompt-tokens must be at least 1")


def _decode_run(pkg, backend: str, prompt: list[int], tokens: int) -> dict:
    """Prefill *prompt*, then *tokens* greedy decode steps on *backend*; cycles and wall time."""
    from host.runtime import open_runtime
    rt = open_runtime(pkg, backend, owner="accllm bench")
    try:
        t0 = time.perf_counter()
        tok = rt.feed(prompt, want="argmax")
        ttft = time.perf_counter() - t0
        prefill_cycles = rt.stats.cycles
        rtl0 = getattr(rt.device, "cycles_rtl_total", None)
        out = [tok]
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok = rt.feed([tok], want="argmax")
            out.append(tok)
        dt = time.perf_counter() - t0
        cyc = rt.stats.cycles
        rtl_model = None if rtl0 is None else rt.device.cycles_rtl_total - rtl0
        hw = rt.device.hw
    finally:
        rt.close()
    return {"tokens": out, "ttft_s": ttft, "decode_s": dt, "prefill_cycles": prefill_cycles,
            "prefill_cycles_rtl_model": rtl0, "decode_cycles_rtl_model": rtl_model,
            "decode_cycles": None if cyc is None or prefill_cycles is None else cyc - prefill_cycles, "hw": hw}


def _bench_rtl(args) -> dict:
    if args.model is None and args.package is None:
        return _bench_rtl_matmul(args)
    import numpy as np
    from pathlib import Path
    _defaults(args, "tiny", 16, 8)
    pkg = args.package or _cached_package(args.model, args.recipe, args.hw)
    mmj = json.loads((Path(pkg) / "memmap.json").read_text())
    V = int(mmj.get("vocab_size", mmj["io"]["logits_out"]["count"]))
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(100, min(V, 20000), args.prompt_tokens)]
    emu = _decode_run(pkg, "emu", prompt, args.tokens)
    rtl = _decode_run(pkg, "rtl", prompt, args.tokens)
    hw = rtl["hw"]
    meas = rtl["decode_cycles"] / args.tokens
    pred = emu["decode_cycles_rtl_model"] / args.tokens
    arch = emu["decode_cycles"] / args.tokens
    return {"backend": "rtl", "simulator": "verilator", "model": args.model, "package": str(pkg), "hw": hw.name,
            "prompt_tokens": args.prompt_tokens, "decode_tokens": args.tokens,
            "cycles_per_token_measured": round(meas, 1), "cycles_per_token_predicted": round(pred, 1),
            "cycles_ratio": round(meas / pred, 3),
            "cycles_per_token_architecture_model": round(arch, 1),
            "prefill_cycles_measured": rtl["prefill_cycles"],
            "prefill_cycles_predicted": emu["prefill_cycles_rtl_model"],
            "sim_cycles_per_s": round(rtl["decode_cycles"] / rtl["decode_s"], 1),
            "decode_ms_at_clock": round(meas / (hw.clock_mhz * 1e3), 3),
            "tokens_match_emu": rtl["tokens"] == emu["tokens"], "tokens": rtl["tokens"],
            "note": ("cycles_per_token_measured: the RTL kernel's cycle register (ap_start to ap_done) per decode "
                     "step under Verilator with the configured HBM read latency; _predicted: sim/cycle.RtlCycleModel "
                     "(the RTL as built: no overlap, attention 16 channels per cycle, one element per cycle in the SFU) for the same programs; "
                     "_architecture_model: sim/cycle.CycleModel (the target design with prefetch and SFU lanes, "
                     "what accllm perf projects; not what this RTL does yet); sim_cycles_per_s: simulated cycles "
                     "per wall-clock second of the decode steps (host calls included)")}


def _bench_rtl_matmul(args) -> dict:
    """Weight-stream efficiency and cycles of a large matrix-vector MATMUL on the RTL (Verilator),
    against the cycle model (sim/cycle.py); plus the DMA's steady-state read efficiency."""
    import tempfile

    from pathlib import Path

    from hw.build_rtl import KERNEL_NAME, cached_verilog, kernel_source
    from hw.config import load_hw
    from hw.rtl.tops import DmaTop, to_verilog
    from sim.cycle import CycleModel
    from sim.toolchain import run_cocotb
    cfg = load_hw(args.hw)
    if cfg.weight_ports > 4:
        raise AccllmError(f"bench rtl simulates the whole kernel; {cfg.name} has {cfg.weight_ports} weight ports, "
                          "too many for a simulation here (use --hw sim-small)")
    from algo.common import package_dir
    tb = package_dir("sim", "tb")          # the cocotb benches (package data of sim)
    out: dict = {"backend": "rtl", "hw": cfg.name, "simulator": "verilator"}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        metrics = td / "metrics.json"
        env = {"RTL_METRICS": str(metrics), "ACCLLM_HW": cfg.name}
        t = time.time()
        run_cocotb(simulator="verilator", toplevel=KERNEL_NAME, sources=[kernel_source(cfg)], test_module="test_kernel",
                   test_dir=tb / "kernel", name=f"{KERNEL_NAME}-{cfg.name}", extra_env=env, results_dir=td,
                   testcase="stream_efficiency", public="top")
        out["kernel_seconds"] = round(time.time() - t, 1)
        k = json.loads(metrics.read_text())
        dv = cached_verilog("dma_top", cfg, lambda: to_verilog(DmaTop(cfg.port_width_bits, cfg.burst_beats,
                                                                      cfg.outstanding_reads), "dma_top"))
        metrics.unlink()
        run_cocotb(simulator="verilator", toplevel="dma_top", sources=[dv], test_module="test_dma", test_dir=tb / "dma",
                   name="dma_top", results_dir=td,
                   extra_env={"RTL_METRICS": str(metrics), "DATA_W": str(cfg.port_width_bits),
                              "HBM_LATENCY": str(cfg.hbm_latency_cycles), "BURST_BEATS": str(cfg.burst_beats)})
        dm = json.loads(metrics.read_text())
    case = k["matmul_case"]
    cm = CycleModel(cfg)
    parts = cm.linear_parts(case["N"], case["K"], case["bits"], case["group"], case["sparse"], case["T"])
    arch = cm.overlapped([parts, (0.0, 1.0)])          # the MATMUL and the END of the program
    from dataclasses import replace

    from sim.cycle import RtlCycleModel
    # the model takes the memory's real round trip: cocotbext-axi's AxiRam plus the added latency
    # answers a few cycles later than the configured latency (the rtl backend's Verilog memory does not)
    lat = int(k.get("read_latency_cycles", cfg.hbm_latency_cycles))
    rm = RtlCycleModel(replace(cfg, hbm_latency_cycles=lat))
    pred = rm.program_cycles([rm.matmul(case["N"], case["K"], case["bits"], case["group"], case["sparse"],
                                        case["T"], False)])
    out.update({
        "stream_efficiency": k["kernel_stream_efficiency"],
        "stream_efficiency_backpressure": k["kernel_stream_efficiency_backpressure"],
        "dma_stream_efficiency": dm["stream_efficiency"],
        "dma_stream_efficiency_backpressure": dm["stream_efficiency_backpressure"],
        "cycles_measured": k["kernel_stream_efficiency_run_cycles"],
        "cycles_predicted": round(pred, 1),
        "cycles_ratio": round(k["kernel_stream_efficiency_run_cycles"] / pred, 3),
        "cycles_predicted_architecture_model": round(arch, 1),
        "read_latency_cycles_measured": lat,
        "matmul": case, "hbm_latency_cycles": cfg.hbm_latency_cycles,
        "note": ("stream_efficiency: weight-port beats per cycle from the first to the last beat of the weight "
                 "stream (port 0, 100-cycle read latency, no back-pressure); _backpressure: 20% random stalls on "
                 "every AXI channel. cycles_measured: the kernel's cycle register for the whole program "
                 "(MATMUL + END); cycles_predicted: sim/cycle.RtlCycleModel (the RTL as built) for the same program; "
                 "cycles_predicted_architecture_model: sim/cycle.CycleModel (target design with prefetch)."),
    })
    return out


def _bench_emu(args) -> dict:
    import numpy as np
    from host.runtime import open_runtime
    _defaults(args, "smollm2-135m", 32, 16)
    pkg = args.package or _cached_package(args.model, args.recipe, args.hw)
    rt = open_runtime(pkg, "emu", owner="accllm bench")
    try:
        rng = np.random.default_rng(0)
        V = rt.proto.vocab_size
        prompt = [int(x) for x in rng.integers(100, min(V, 20000), args.prompt_tokens)]
        t0 = time.perf_counter()
        tok = rt.feed(prompt, want="argmax")
        ttft = time.perf_counter() - t0
        rt.feed([tok], want="argmax")          # warm-up step (weight decode cache)
        c0 = rt.stats.cycles
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            tok = rt.feed([tok], want="argmax")
        dt = time.perf_counter() - t0
        cyc = None if c0 is None or rt.stats.cycles is None else (rt.stats.cycles - c0) / args.tokens
        hw = rt.device.hw
    finally:
        rt.close()
    return {"backend": "emu", "model": args.model, "package": str(pkg), "hw": hw.name,
            "decode_tokens": args.tokens, "decode_tokens_per_s": args.tokens / dt, "ttft_s": ttft,
            "prompt_tokens": args.prompt_tokens,
            "cycles_per_token_model": cyc,
            "note": "wall-clock speed of the functional model on this machine (not the accelerator's speed)"}


def run(args) -> int:
    import importlib
    if args.backend not in BACKENDS:
        raise AccllmError(f"unknown backend {args.backend!r} for bench; available: {', '.join(BACKENDS)}")
    mod, fn = BACKENDS[args.backend].split(":")
    mod = importlib.import_module(mod)
    res = getattr(mod, fn)(args)
    if args.json:                        # one document on stdout; host.cli sends everything else to stderr
        from host.args import emit_json
        emit_json(args, res, indent=1)
    elif hasattr(mod, "print_summary"):  # a backend's own table
        mod.print_summary(res)
    else:
        for k, v in res.items():
            print(f"  {k:<24} {v}")
    return 1 if res.get("passed") is False else 0
