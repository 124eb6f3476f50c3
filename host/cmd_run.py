"""``accllm run``: generate text from a compiled package on a device (emu | rtl | xrt)."""
from __future__ import annotations

import sys
import time

DESCRIPTION = """Generate text from a compiled package on the accelerator: the functional model (emu), the
RTL under Verilator (rtl) or an Alveo card (xrt). The same host code drives all three: upload the
weights once, prefill the prompt (chunked into the package's prefill buckets), then decode token by
token with host-side sampling, streaming the text as it comes.

Reports time to first token and decode tokens/s (wall clock); for rtl also the kernel's cycle counter
and the time those cycles mean at the configuration's clock."""
EPILOG = """examples:
  accllm run --package build/tiny --backend emu --prompt "The capital of France is" --max-new-tokens 8 --json
  accllm run --package build/tiny --backend rtl --prompt "Hello" --max-new-tokens 16
  accllm run --package build/smollm2 --backend xrt --xclbin accllm.xclbin --prompt "..." --temperature 0.7 --top-p 0.9"""


def add_arguments(p) -> None:
    p.add_argument("--package", required=True, metavar="DIR", help="compiled package (compile-model --hw ...)")
    p.add_argument("--backend", default="emu", choices=("emu", "rtl", "xrt"), help="device (default %(default)s)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--xclbin", default=None, help="xrt: the bitstream (default $ACCLLM_XCLBIN)")
    p.add_argument("--device-index", type=int, default=0, help="xrt: card index (default 0)")
    p.add_argument("--rtl-dir", default=None, help="rtl: existing `accllm build-rtl` output (default: built and cached)")
    p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"), help="rtl: simulator")
    p.add_argument("--timeout", type=float, default=None, help="seconds one device run may take "
                   "(default: emu 600, rtl 3600, xrt 10)")
    p.add_argument("--wait", type=float, default=0.0, help="if the device is busy, wait this many seconds "
                   "for it (default: refuse at once)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def run(args) -> int:
    from algo.common import AccllmError
    from algo.eval import format_table
    from host.runtime import Sampling, open_runtime

    if args.max_new_tokens < 1:
        raise AccllmError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    kw = {}
    if args.backend == "xrt":
        from host.backends.xrt import import_pyxrt
        import_pyxrt()                      # without XRT: one clear line before any other work
        kw = dict(xclbin=args.xclbin, device_index=args.device_index)
    elif args.backend == "rtl":
        kw = dict(rtl_dir=args.rtl_dir, simulator=args.simulator)
    t0 = time.perf_counter()
    rt = open_runtime(args.package, args.backend, owner=f"accllm run (pid {__import__('os').getpid()})",
                      wait_s=args.wait, timeout_s=args.timeout, **kw)
    with rt:
        t_open = time.perf_counter() - t0
        ids = rt.encode(args.prompt)
        tokens = []
        interrupted = False
        if not args.json:
            sys.stdout.write(args.prompt)
            sys.stdout.flush()
        shown = ""
        try:
            for tok in rt.generate(ids, args.max_new_tokens, sampling, stop_at_eos=not args.ignore_eos):
                tokens.append(tok)
                if not args.json:
                    text = rt.decode(tokens)
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    shown = text
        except KeyboardInterrupt:
            interrupted = True
        st = rt.stats
        hw = rt.device.hw
        res = {"tokens": tokens, "text": rt.decode(tokens), "prompt_tokens": len(ids),
               "ttft_s": round(st.ttft_s, 6), "decode_tokens_per_s": round(st.decode_tokens_per_s, 3),
               "backend": args.backend, "hw": hw.name, "open_s": round(t_open, 3),
               "upload_s": round(rt.upload_seconds, 3), "interrupted": interrupted}
        if st.cycles is not None and args.backend in ("rtl", "emu"):
            res["cycles"] = st.cycles
            res["prefill_cycles"] = st.prefill_cycles
            res["decode_cycles"] = st.decode_cycles
            n_dec = max(len(tokens) - 1, 0)
            res["clock_mhz"] = hw.clock_mhz
            res["cycles_time_s"] = st.cycles / (hw.clock_mhz * 1e6)
            if n_dec and st.decode_cycles:
                res["cycles_per_decode_token"] = st.decode_cycles / n_dec
                res["decode_tokens_per_s_at_clock"] = hw.clock_mhz * 1e6 * n_dec / st.decode_cycles
            if args.backend == "rtl":
                res["sim_cycles"] = getattr(rt.device, "sim_cycles", None)
    if interrupted:
        print("\ninterrupted: generation stopped, device released", file=sys.stderr)
    if args.json:
        from host.args import emit_json
        emit_json(args, res)
        return 130 if interrupted else 0
    print()
    rows = [("backend / hw", f"{args.backend} / {hw.name}"),
            ("prompt / new tokens", f"{len(ids)} / {len(tokens)}"),
            ("open + upload", f"{res['open_s']:.2f} s (upload {res['upload_s']:.2f} s)"),
            ("time to first token", f"{res['ttft_s']:.3f} s (wall)"),
            ("decode", f"{res['decode_tokens_per_s']:.2f} tokens/s (wall)")]
    if "cycles" in res:
        rows.append(("device cycles", f"{res['cycles']} = {res['cycles_time_s'] * 1e3:.3f} ms at {hw.clock_mhz:g} MHz"))
        if "decode_tokens_per_s_at_clock" in res:
            rows.append(("decode at the clock", f"{res['cycles_per_decode_token']:.0f} cycles/token = "
                         f"{res['decode_tokens_per_s_at_clock']:.1f} tokens/s"))
    print(format_table(rows))
    return 130 if interrupted else 0
