"""Small helpers shared by the RTL cocotb benches."""
from __future__ import annotations

import json
import os

from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, ReadOnly, RisingEdge


async def start_clock_and_reset(dut, cycles: int = 4):
    Clock(dut.ap_clk, 10, unit="ns").start()
    dut.ap_rst_n.value = 0
    await ClockCycles(dut.ap_clk, cycles)
    dut.ap_rst_n.value = 1
    await RisingEdge(dut.ap_clk)


async def wait_for(dut, predicate, max_cycles: int, what: str) -> int:
    """Wait (checking after each rising edge) until predicate() holds; returns the cycles waited.
    The bound comes from the work the caller expects, never a magic constant."""
    for n in range(max_cycles):
        await RisingEdge(dut.ap_clk)
        await ReadOnly()
        if predicate():
            await RisingEdge(dut.ap_clk)
            return n + 1
    raise AssertionError(f"timeout after {max_cycles} cycles waiting for {what}")


def record(key: str, value) -> None:
    """Append a measured number to the JSON file named by $RTL_METRICS (read by pytest / bench)."""
    path = os.environ.get("RTL_METRICS")
    if not path:
        return
    d = {}
    if os.path.exists(path):
        with open(path) as f:
            d = json.load(f)
    d[key] = value
    with open(path, "w") as f:
        json.dump(d, f, indent=1)
