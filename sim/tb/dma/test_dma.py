"""cocotb bench of the read and write DMAs (hw.rtl.tops.DmaTop) against a cocotbext-axi AxiRam
with >= 100 cycles of read latency and random back-pressure."""
import os
import random

import cocotb
from cocotb.triggers import FallingEdge, RisingEdge

from sim.rtlsim.axi_mem import axi_ram
from sim.tb.rtlcommon.bench import record, start_clock_and_reset, wait_for

DATA_W = int(os.environ.get("DATA_W", "256"))
BYTES = DATA_W // 8
LATENCY = int(os.environ.get("HBM_LATENCY", "100"))
BURST = int(os.environ.get("BURST_BEATS", "16"))
MEM = 1 << 20


async def setup(dut, seed, p_stall):
    ram = axi_ram(dut, "m_axi_mem", MEM, LATENCY)
    for s in (dut.start, dut.copy, dut.sink_ready, dut.src, dut.dst, dut.beats):
        s.value = 0
    await start_clock_and_reset(dut)
    rng = random.Random(seed)
    if p_stall:
        ram.pauses(rng, p_stall)
    return ram, rng


async def launch(dut, src, dst, beats, copy):
    await FallingEdge(dut.ap_clk)
    dut.src.value, dut.dst.value, dut.beats.value, dut.copy.value = src, dst, beats, int(copy)
    dut.start.value = 1
    await FallingEdge(dut.ap_clk)
    dut.start.value = 0


def limit(beats, p_stall, sink_p=1.0):
    # latency of the first burst + every beat at the slowest expected rate (x4 margin)
    rate = (1 - p_stall) ** 2 * sink_p
    return int(4 * (LATENCY + 4 * BURST + beats / rate))


async def read_only(dut, beats, p_stall, sink_p, seed):
    ram, rng = await setup(dut, seed, p_stall)

    async def sink():
        while True:
            await FallingEdge(dut.ap_clk)
            dut.sink_ready.value = int(rng.random() < sink_p)
    cocotb.start_soon(sink())
    src = 3 * BYTES  # beat aligned, not burst aligned: the first burst is short
    await launch(dut, src, 0, beats, False)
    await wait_for(dut, lambda: not int(dut.busy.value), limit(beats, p_stall, sink_p), "read DMA")
    consumed, first, last = int(dut.consumed.value), int(dut.first_cycle.value), int(dut.last_cycle.value)
    assert consumed == beats, f"{consumed} beats consumed, expected {beats}"
    steady = beats / (last - first + 1)
    overall = beats / (last + 1)
    assert ram.read_if.bursts >= beats // BURST
    return steady, overall, first


@cocotb.test()
async def read_efficiency_no_backpressure(dut):
    beats = 64 * BURST
    steady, overall, first = await read_only(dut, beats, 0.0, 1.0, 1)
    dut._log.info(f"read {beats} beats, latency {LATENCY}: first beat at cycle {first}, "
                  f"steady-state {steady:.3f} beats/cycle, including latency {overall:.3f}")
    record("stream_efficiency", round(steady, 4))
    record("stream_efficiency_incl_latency", round(overall, 4))
    assert first >= LATENCY, "the memory model did not add its latency"
    assert steady >= 0.9, f"stream efficiency {steady:.3f} < 0.9 of the port peak"


@cocotb.test()
async def read_efficiency_random_backpressure(dut):
    beats = 16 * BURST
    steady, overall, first = await read_only(dut, beats, 0.2, 0.8, 2)
    dut._log.info(f"with 20% slave stalls per channel and an 80% ready consumer: {steady:.3f} beats/cycle")
    record("stream_efficiency_backpressure", round(steady, 4))


@cocotb.test()
async def copy_with_backpressure(dut):
    """Read + write DMA: unaligned starts, bursts crossing 4 KiB windows, random lengths."""
    ram, rng = await setup(dut, 3, 0.3)
    for trial in range(6):
        beats = rng.choice([1, 2, BURST - 1, BURST, BURST + 1, 3 * BURST + 5, rng.randrange(1, 200)])
        src = rng.randrange(0, MEM // 2 - beats * BYTES) // BYTES * BYTES
        if trial == 0:
            src = 4096 - 2 * BYTES   # straddles a 4 KiB boundary
        dst = MEM // 2 + rng.randrange(0, MEM // 2 - beats * BYTES) // BYTES * BYTES
        payload = rng.randbytes(beats * BYTES)
        ram.write(src, payload)
        ram.write(dst, bytes(beats * BYTES))
        await launch(dut, src, dst, beats, True)
        await wait_for(dut, lambda: not int(dut.busy.value), 2 * limit(beats, 0.3), "copy")
        assert not int(dut.error.value)
        got = ram.read(dst, beats * BYTES)
        assert got == payload, f"trial {trial}: copy of {beats} beats {src:#x}->{dst:#x} differs"
        assert ram.read(dst + beats * BYTES, BYTES) == bytes(BYTES) or dst + beats * BYTES >= MEM, "wrote past the end"
    await RisingEdge(dut.ap_clk)
