"""Child process of the ``rtl`` backend: builds (cached) and runs the kernel's Verilog under the
simulator with host/backends/rtl_server.py as the cocotb test, which serves the host over a Unix
socket. Started by host/backends/rtl.py in its own process group; not meant to be run by hand.

    python -m host.backends.rtl_sim --sock PATH --rtl DIR [--simulator verilator] [--toplevel accllm_kernel]
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
    a = p.parse_args(argv)

    from cocotb_tools.runner import get_runner

    from sim.toolchain import build_dir, setup_env

    setup_env(a.simulator)
    rtl = Path(a.rtl)
    sources = sorted(p for p in rtl.iterdir() if p.suffix in (".v", ".sv"))
    bdir = build_dir(a.simulator, f"rtl-backend-{a.toplevel}", sources)
    runner = get_runner(a.simulator)
    build_args = []
    if a.simulator == "verilator":
        build_args = ["-Wno-fatal", "-Wno-WIDTH", "-Wno-UNUSED", "-Wno-PINCONNECTEMPTY", "--x-assign", "0",
                      "--x-initial", "0", "-O2"]
    print(f"[rtl] building {a.toplevel} with {a.simulator} in {bdir} (cached after the first time)", flush=True)
    runner.build(sources=sources, hdl_toplevel=a.toplevel, build_dir=bdir, build_args=build_args,
                 always=False, timescale=("1ns", "1ps"), log_file=bdir / "build.log")
    repo = str(Path(__file__).resolve().parents[2])
    env = {"ACCLLM_RTL_SOCK": a.sock, "ACCLLM_RTL_PERIOD_NS": a.period_ns, "ACCLLM_RTL_LATENCY": a.latency,
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
           "COCOTB_LOG_LEVEL": os.environ.get("COCOTB_LOG_LEVEL", "WARNING")}
    print("[rtl] simulator started", flush=True)
    runner.test(hdl_toplevel=a.toplevel, test_module="host.backends.rtl_server", build_dir=bdir,
                test_dir=Path(a.sock).parent, extra_env=env,
                results_xml=Path(a.sock).parent / "results.xml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
