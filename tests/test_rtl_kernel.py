"""Kernel-level RTL tests: the whole accllm_kernel (sim-small) under cocotb, host-like bench."""
import json
import time
from pathlib import Path

import pytest

from hw.config import load_hw
from hw.build_rtl import kernel_source
from sim.toolchain import run_cocotb

TB = Path(__file__).resolve().parents[1] / "sim" / "tb" / "kernel"


def run_kernel(tmp_path, simulator, testcase=None, env=None, sets=()):
    cfg = load_hw("sim-small", list(sets))
    v = kernel_source(cfg)
    metrics = tmp_path / "metrics.json"
    t = time.time()
    tag = "".join("-" + s.replace("=", "") for s in sets)
    run_cocotb(simulator=simulator, toplevel="accllm_kernel", sources=[v], test_module="test_kernel", test_dir=TB,
               name=f"accllm_kernel-sim-small{tag}",
               extra_env=dict(env or {}, RTL_METRICS=str(metrics), ACCLLM_HW_SET=",".join(sets)),
               results_dir=tmp_path, testcase=testcase, public="top")     # the bench drives the ports only
    out = json.loads(metrics.read_text()) if metrics.exists() else {}
    out["_seconds"] = time.time() - t
    return out


def test_kernel_verilator(tmp_path):
    m = run_kernel(tmp_path, "verilator")
    assert m["kernel_stream_efficiency"] >= 0.9


@pytest.mark.slow
def test_kernel_verilator_512_bit_ports(tmp_path):
    """The u280's port width (512 bits: 256 lanes and 16 chunks per port, other scale/zero windows and
    idx shifts) is simulated nowhere else: the MATMUL cases on sim-small with 512-bit ports."""
    run_kernel(tmp_path, "verilator", testcase="matmul_dense_w2_w4_w8,matmul_sparse_24,matmul_largest_k",
               sets=["port_width_bits=512"])


@pytest.mark.slow
def test_kernel_verilator_16_bit_scales(tmp_path):
    """Both presets use 8-bit scale mantissas and a build's engine has the scale path of its
    configuration only: the 16-bit path, and the rejection of 8-bit descriptors, on a 16-bit build."""
    run_kernel(tmp_path, "verilator", testcase="matmul_dense_w2_w4_w8,matmul_sparse_24,bad_programs",
               sets=["scale_bits=16"])


@pytest.mark.slow
def test_kernel_icarus(tmp_path):
    run_kernel(tmp_path, "icarus", testcase="matmul_dense_w2_w4_w8,bad_programs")
