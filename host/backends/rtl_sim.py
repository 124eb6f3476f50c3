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

    from sim.toolchain import build_design

    rtl = Path(a.rtl)
    sources = sorted(p for p in rtl.iterdir() if p.suffix in (".v", ".sv"))
    print(f"[rtl] building {a.toplevel} with {a.simulator} (cached after the first time)", flush=True)
    runner, bdir = build_design(a.simulator, a.toplevel, sources, f"rtl-backend-{a.toplevel}")
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
