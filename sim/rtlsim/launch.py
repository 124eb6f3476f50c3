"""Child process of the ``rtl`` backend: builds (cached) and runs the kernel's Verilog under the
simulator with sim/rtlsim/server.py as the cocotb test, which serves the host over a Unix
socket. Started by sim/rtlsim/device.py in its own process group; not meant to be run by hand.

    python -m sim.rtlsim.launch --sock PATH --rtl DIR [--simulator verilator] [--toplevel accllm_kernel]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sock", required=True)
    p.add_argument("--rtl", required=True)
    p.add_argument("--simulator", default="verilator")
    p.add_argument("--toplevel", default="accllm_kernel")
    p.add_argument("--period-ns", default="10")
    p.add_argument("--latency", default="100")
    p.add_argument("--mem", choices=("hdl", "cocotb"), default="hdl",
                   help="hdl: sim/simtop.py top with Verilog memories (fast); cocotb: cocotbext-axi AxiRam models")
    p.add_argument("--weight-ports", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    a = p.parse_args(argv)

    from sim.toolchain import build_design, run_built

    rtl = Path(a.rtl)
    env = {}
    if a.mem == "hdl":
        from types import SimpleNamespace
        from sim.simtop import TOP, ports, sim_top_sources
        cfg = SimpleNamespace(weight_ports=a.weight_ports, port_width_bits=a.width)
        sources = sim_top_sources(rtl, cfg, int(a.latency))
        top = TOP
        env = {"ACCLLM_RTL_PORTS": ",".join(ports(cfg)), "ACCLLM_RTL_BEAT_BYTES": str(a.width // 8)}
    else:
        sources = sorted(p for p in rtl.iterdir() if p.suffix in (".v", ".sv"))
        top = a.toplevel
    print(f"[rtl] building {top} with {a.simulator} (cached after the first time)", flush=True)
    runner, bdir = build_design(a.simulator, top, sources, f"rtl-backend-{top}",
                                public="top" if a.mem == "hdl" else "all")
    from algo.common import child_pythonpath
    env.update({"ACCLLM_RTL_SOCK": a.sock, "ACCLLM_RTL_PERIOD_NS": a.period_ns, "ACCLLM_RTL_LATENCY": a.latency,
                "PYTHONPATH": child_pythonpath(),
                "COCOTB_LOG_LEVEL": os.environ.get("COCOTB_LOG_LEVEL", "WARNING")})
    print("[rtl] simulator started", flush=True)
    # the server is one cocotb test (serve): a run where it failed, or where no test ran, is an error
    from algo.common import AccllmError
    try:
        run_built(runner, bdir, simulator=a.simulator, toplevel=top, test_module="sim.rtlsim.server",
                  test_dir=Path(a.sock).parent, extra_env=env, results=Path(a.sock).parent / "results.xml",
                  testcase="serve")
    except AccllmError as e:
        print(f"[rtl] error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
