"""Smoke test: the RTL toolchain is really there (Amaranth → Verilog → cocotb on both simulators)."""
from pathlib import Path

import pytest

from hw.smoke import export
from sim.toolchain import run_cocotb

TB = Path(__file__).resolve().parents[1] / "sim" / "tb" / "smoke"


@pytest.mark.parametrize("simulator", ["verilator", "icarus"])
def test_amaranth_to_cocotb(simulator, tmp_path):
    v = tmp_path / "stream_acc.v"
    export(v)
    text = v.read_text()
    assert "module stream_acc" in text
    run_cocotb(simulator=simulator, toplevel="stream_acc", sources=[v], test_module="test_stream_acc",
               test_dir=TB, name="smoke", results_dir=tmp_path)
