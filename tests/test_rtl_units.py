"""RTL unit benches (cocotb on Verilator by default, Icarus too): DMA and s_axi_control."""
import json
from pathlib import Path

import pytest

from hw.build_rtl import cached_verilog
from hw.config import load_hw
from hw.rtl.tops import ControlTop, DmaTop, to_verilog
from sim.toolchain import run_cocotb

TB = Path(__file__).resolve().parents[1] / "sim" / "tb"


def _run(tmp_path, simulator, top, name, unit, env=None, testcase=None):
    v = cached_verilog(name, load_hw("sim-small"), lambda: to_verilog(top, name))
    metrics = tmp_path / "metrics.json"
    env = dict(env or {}, RTL_METRICS=str(metrics))
    run_cocotb(simulator=simulator, toplevel=name, sources=[v], test_module=f"test_{unit}", test_dir=TB / unit,
               name=name, extra_env=env, results_dir=tmp_path, testcase=testcase)
    return json.loads(metrics.read_text()) if metrics.exists() else {}


@pytest.mark.parametrize("simulator", ["verilator", "icarus"])
def test_dma(simulator, tmp_path):
    cfg = load_hw("sim-small")
    m = _run(tmp_path, simulator, DmaTop(cfg.port_width_bits, cfg.burst_beats, cfg.outstanding_reads), "dma_top",
             "dma", env={"DATA_W": str(cfg.port_width_bits), "HBM_LATENCY": str(cfg.hbm_latency_cycles),
                         "BURST_BEATS": str(cfg.burst_beats)})
    assert m["stream_efficiency"] >= 0.9


@pytest.mark.parametrize("simulator", ["verilator", "icarus"])
def test_control(simulator, tmp_path):
    _run(tmp_path, simulator, ControlTop(load_hw("sim-small")), "control_top", "control")
