"""Kernel-level RTL tests: the whole accllm_kernel (sim-small) under cocotb, host-like bench."""
import json
import time
from pathlib import Path

import pytest

from hw.config import load_hw
from hw.build_rtl import kernel_source
from sim.toolchain import run_cocotb

TB = Path(__file__).resolve().parents[1] / "sim" / "tb" / "kernel"


def run_kernel(tmp_path, simulator, testcase=None, env=None):
    cfg = load_hw("sim-small")
    v = kernel_source(cfg)
    metrics = tmp_path / "metrics.json"
    t = time.time()
    run_cocotb(simulator=simulator, toplevel="accllm_kernel", sources=[v], test_module="test_kernel", test_dir=TB,
               name="accllm_kernel-sim-small", extra_env=dict(env or {}, RTL_METRICS=str(metrics)),
               results_dir=tmp_path, testcase=testcase)
    out = json.loads(metrics.read_text()) if metrics.exists() else {}
    out["_seconds"] = time.time() - t
    return out


def test_kernel_verilator(tmp_path):
    m = run_kernel(tmp_path, "verilator")
    assert m["kernel_stream_efficiency"] >= 0.9


@pytest.mark.slow
def test_kernel_icarus(tmp_path):
    run_kernel(tmp_path, "icarus", testcase="matmul_dense_w2_w4_w8,bad_programs")
