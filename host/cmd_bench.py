"""``accllm bench BACKEND``: benchmark a device backend (``emu`` here; the RTL helper adds ``rtl``).

Adding a backend: put ``"rtl": "module:function"`` into BACKENDS (function(args) -> dict, printed as
JSON with --json) and, if it needs options of its own, add them in ``add_arguments`` (they are shared
by every backend, so give them backend-neutral names or document which backend reads them)."""
from __future__ import annotations

import json
import time

from algo.common import AccllmError

DESCRIPTION = """Benchmark a backend of the accelerator.

emu: decode speed of the functional model (sim/emu.py) on this machine: compiles the model for the
hardware configuration (cached in the accllm cache, keyed by model, recipe and configuration; or
--package DIR), prefills a prompt, then times --tokens decode steps."""
EPILOG = "example: accllm bench emu --model smollm2-135m --json"

BACKENDS: dict[str, str] = {"emu": "host.cmd_bench:_bench_emu",   # backend -> "module:function(args)->dict"
                            "rtl": "hw.build_rtl:bench_rtl"}       # reads --hw (RTL kernel on Verilator)


def add_arguments(p) -> None:
    p.add_argument("backend", help="backend to benchmark: " + " | ".join(BACKENDS))
    p.add_argument("--model", default="smollm2-135m", help="model (default smollm2-135m)")
    p.add_argument("--recipe", default="accllm", help="recipe for the cached package (default accllm)")
    p.add_argument("--hw", default="sim-small", help="hardware configuration (default sim-small)")
    p.add_argument("--package", default=None, metavar="DIR", help="use this compiled package instead")
    p.add_argument("--tokens", type=int, default=32, help="decode steps to time (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length before decoding (default 16)")
    p.add_argument("--json", action="store_true")


def _cached_package(model: str, recipe: str, hw: str):
    import hashlib
    import subprocess
    import sys
    from pathlib import Path
    from algo.common import cache_dir
    from algo.models import load_model  # noqa: F401  (validates the name early below)
    key = hashlib.sha256(f"{model}|{recipe}|{hw}".encode()).hexdigest()[:16]
    d = Path(cache_dir("bench")) / f"{Path(model).name}-{recipe}-{hw}-{key}"
    if not (d / "memmap.json").is_file():
        print(f"compiling {model} ({recipe}) for {hw} into {d} (once) ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-c", "import sys; from host.cli import compile_model_main; "
                            "sys.exit(compile_model_main(sys.argv[1:]))", "--model", model, "--recipe", recipe,
                            "--hw", hw, "--out", str(d)])
        if r.returncode != 0:
            raise AccllmError(f"compiling {model} for the benchmark failed (exit {r.returncode})")
    return d


def _bench_emu(args) -> dict:
    import numpy as np
    from host.runtime import open_runtime
    if args.tokens < 1 or args.prompt_tokens < 1:
        raise AccllmError("--tokens and --prompt-tokens must be at least 1")
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
    res = getattr(importlib.import_module(mod), fn)(args)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            print(f"  {k:<24} {v}")
    return 0
