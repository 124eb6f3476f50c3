"""AXI memory models for the RTL benches: cocotbext-axi ``AxiRam`` with an added read latency.

cocotbext-axi 0.1.28 has no latency knob and its read process serves one AR at a time, so
``LatencyAxiRamRead`` replaces that process: every AR is accepted at once (the slave queues up to
``max_outstanding`` of them), and its first beat is released ``latency`` cycles after its address
handshake; beats of later bursts follow back to back — like an HBM pseudo-channel that pipelines
requests. Random pauses come from cocotbext-axi's pause generators on AR/R/AW/W/B.
"""
from __future__ import annotations

import random
from collections import deque

from cocotb.triggers import RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster
from cocotbext.axi.axi_ram import AxiRamRead, AxiRamWrite
from cocotbext.axi.constants import AxiResp
from cocotbext.axi.memory import Memory


class LatencyAxiRamRead(AxiRamRead):
    def __init__(self, *args, latency: int = 100, max_outstanding: int = 64, **kwargs):
        self.latency = latency
        self.max_outstanding = max_outstanding
        self.bursts = 0
        super().__init__(*args, **kwargs)
        self.ar_channel.queue_occupancy_limit = max_outstanding

    async def _process_read(self):
        pending: deque = deque()
        beats: deque = deque()
        cycle = 0
        while True:
            await RisingEdge(self.clock)
            cycle += 1
            while not self.ar_channel.empty():
                pending.append((cycle + self.latency, self.ar_channel.recv_nowait()))
            while not self.r_channel.full() and (beats or (pending and pending[0][0] <= cycle)):
                if not beats:
                    _, ar = pending.popleft()
                    self.bursts += 1
                    addr, length = int(ar.araddr), int(ar.arlen) + 1
                    size = 1 << int(ar.arsize)
                    assert int(ar.arburst) == 1, "only INCR bursts are expected"
                    assert 0x1000 - (addr & 0xFFF) >= size * length, f"burst crosses 4 KiB at {addr:#x}"
                    assert size == self.byte_lanes, "narrow bursts are not expected"
                    for n in range(length):
                        a = (addr // self.byte_lanes) * self.byte_lanes + n * size
                        r = self.r_channel._transaction_obj()
                        r.rid = int(ar.arid)
                        r.rlast = n == length - 1
                        r.rresp = AxiResp.OKAY
                        r.rdata = int.from_bytes(await self._read(a, self.byte_lanes), "little")
                        beats.append(r)
                self.r_channel.send_nowait(beats.popleft())


class LatencyAxiRam(Memory):
    """AxiRam (both directions on one port) whose reads take *latency* cycles."""

    def __init__(self, bus, clock, reset=None, reset_active_level=True, size=2**20, latency=100):
        super().__init__(size)
        self.write_if = AxiRamWrite(bus.write, clock, reset, reset_active_level, size=size, mem=self.mem)
        self.read_if = LatencyAxiRamRead(bus.read, clock, reset, reset_active_level, size=size, mem=self.mem,
                                         latency=latency)

    def pauses(self, rng: random.Random, p_stall: float) -> None:
        """Random back-pressure: each channel of the slave stalls a cycle with probability p_stall."""
        def gen():
            while True:
                yield rng.random() < p_stall
        for ch in (self.read_if.ar_channel, self.read_if.r_channel, self.write_if.aw_channel,
                   self.write_if.w_channel, self.write_if.b_channel):
            ch.set_pause_generator(gen())


def axi_ram(dut, prefix: str, size: int, latency: int) -> LatencyAxiRam:
    return LatencyAxiRam(AxiBus.from_prefix(dut, prefix), dut.ap_clk, dut.ap_rst_n, reset_active_level=False,
                         size=size, latency=latency)


def control_master(dut) -> AxiLiteMaster:
    return AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.ap_clk, dut.ap_rst_n,
                         reset_active_level=False)
