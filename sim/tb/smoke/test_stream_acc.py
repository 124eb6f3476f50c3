"""cocotb test of hw.smoke.StreamAccumulator with random valid/ready back-pressure."""
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly, RisingEdge


@cocotb.test()
async def accumulate_with_backpressure(dut):
    rng = random.Random(1)
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    dut.i__valid.value = 0
    dut.o__ready.value = 0
    dut.clear.value = 0
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0
    values = [rng.randrange(256) for _ in range(200)]
    expected, seen, acc, idx = [], [], 0, 0
    # Bounded by the work: each input needs at most a few cycles at these valid/ready rates.
    for _ in range(40 * len(values)):
        await FallingEdge(dut.clk)
        in_valid = idx < len(values) and rng.random() < 0.7
        dut.i__valid.value = int(in_valid)
        dut.i__payload.value = values[idx] if idx < len(values) else 0
        dut.o__ready.value = int(rng.random() < 0.6)
        await ReadOnly()  # signals as the next rising edge will see them
        if int(dut.o__valid.value) and int(dut.o__ready.value):
            seen.append(int(dut.o__payload.value))
        if in_valid and int(dut.i__ready.value):
            acc = (acc + values[idx]) & 0xFFFF
            expected.append(acc)
            idx += 1
        await RisingEdge(dut.clk)
        if idx == len(values) and seen and seen[-1] == expected[-1]:
            break
    assert idx == len(values), f"only {idx} of {len(values)} inputs accepted"
    assert seen, "no output seen"
    assert all(s in expected for s in seen), "output is not a running sum of the inputs"
    assert seen == sorted(seen, key=expected.index), "outputs out of order"
    assert seen[-1] == expected[-1], f"final sum {seen[-1]} != {expected[-1]}"
