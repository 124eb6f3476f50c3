"""Stream drivers for the RTL unit benches (Amaranth ``stream`` ports flattened as
``<name>__valid`` / ``__ready`` / ``__payload``; clock ``clk``, reset ``rst``)."""
from __future__ import annotations

import random

from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge


def s32(v: int, bits: int = 32) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


async def reset(dut, cycles: int = 3):
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    await ClockCycles(dut.clk, cycles)
    dut.rst.value = 0
    await FallingEdge(dut.clk)


class Stream:
    def __init__(self, dut, name: str, bits: int = 32):
        self.dut, self.bits = dut, bits
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.name = name

    def idle_source(self):
        self.valid.value = 0

    async def send(self, values, rng: random.Random | None = None, p: float = 1.0, limit: int = 1_000_000):
        clk = self.dut.clk
        waited = 0
        for v in values:
            while rng is not None and rng.random() > p:
                self.valid.value = 0
                await RisingEdge(clk)
            self.valid.value = 1
            self.payload.value = int(v) & ((1 << self.bits) - 1)
            while True:
                await RisingEdge(clk)
                waited += 1
                assert waited < limit, f"stream {self.name}: not accepted within {limit} cycles"
                if int(self.ready.value):
                    break
        self.valid.value = 0

    async def recv(self, count: int, rng: random.Random | None = None, p: float = 1.0, limit: int = 1_000_000,
                   signed: bool = True):
        clk = self.dut.clk
        out = []
        cycles = 0
        while len(out) < count:
            self.ready.value = int(rng is None or rng.random() < p)
            await RisingEdge(clk)
            cycles += 1
            assert cycles < limit, f"stream {self.name}: {len(out)} of {count} outputs after {limit} cycles"
            if int(self.ready.value) and int(self.valid.value):
                v = int(self.payload.value)
                out.append(s32(v, self.bits) if signed else v)
        self.ready.value = 0
        return out


async def pulse(dut, sig_name: str = "start", **fields):
    """Set the command fields and pulse *sig_name* for one cycle (driven after a falling edge)."""
    await FallingEdge(dut.clk)
    for k, v in fields.items():
        getattr(dut, k).value = int(v)
    getattr(dut, sig_name).value = 1
    await FallingEdge(dut.clk)
    getattr(dut, sig_name).value = 0


async def wait_idle(dut, limit: int, what: str = "busy"):
    for n in range(limit):
        await RisingEdge(dut.clk)
        if not int(getattr(dut, what).value):
            return n
    raise AssertionError(f"{what} still high after {limit} cycles")
