"""cocotb bench of the top-k engine (hw.rtl.topk.TopK) against algo/topk.py: the selected set
(ascending positions) must be identical, including ties (lower position wins), k = n, k = 0."""
import os
import random

import cocotb
import numpy as np

from algo.topk import topk_numpy, topk_reference
from sim.tb.sfu.streams import Stream, pulse, reset, wait_idle

MAX_N = int(os.environ.get("MAX_N", "256"))
WIDTH = int(os.environ.get("WIDTH", "32"))


async def select(dut, s, k, seed):
    rng = random.Random(seed)
    si, so = Stream(dut, "i", bits=WIDTH), Stream(dut, "o")
    await pulse(dut, n=len(s), k=k)
    send = cocotb.start_soon(si.send(s, rng, 0.8))
    out = await so.recv(k, random.Random(seed + 1), 0.8, limit=64 * len(s) * (len(s).bit_length() + 4) + 100,
                        signed=False)
    await send
    await wait_idle(dut, 4 * len(s) + 10)
    return np.array(out, np.int64), int(dut.rounds.value)


@cocotb.test()
async def topk_cases(dut):
    await reset(dut)
    rng = np.random.default_rng(7)
    n = MAX_N
    cases = [
        ("random", rng.integers(-(1 << (WIDTH - 1)), (1 << (WIDTH - 1)) - 1, n, dtype=np.int64), n // 5),
        ("random close", (1 << (WIDTH - 2)) + rng.integers(0, 4, n, dtype=np.int64), n // 2),
        ("ties", rng.integers(-3, 3, n), n // 3),
        ("all equal", np.full(n, 42), 17),
        ("k = n", rng.integers(-100, 100, n), n),
        ("k = 0", rng.integers(-100, 100, n), 0),
        ("k = 1", rng.integers(-100, 100, n), 1),
        ("k = n - 1 with ties", rng.integers(0, 2, n), n - 1),
        ("n = 1", np.array([5]), 1),
        ("short", rng.integers(-5, 5, 9), 4),
        ("descending", np.arange(n)[::-1].copy(), n // 2),
    ]
    rounds = []
    for c, (name, s, k) in enumerate(cases):
        got, r = await select(dut, s, k, c)
        want = topk_numpy(s, k)
        assert np.array_equal(want, topk_reference(s, k))
        assert np.array_equal(got, want), f"{name}: got {got[:12]}... want {want[:12]}..."
        rounds.append(r)
    dut._log.info(f"quick-select rounds per case: {rounds}")


@cocotb.test()
async def bad_k_sets_error(dut):
    await reset(dut)
    await pulse(dut, n=4, k=5)
    await wait_idle(dut, 5)
    assert int(dut.error.value) == 1 and not int(dut.busy.value), "k > n must set error without running"
    got, _ = await select(dut, np.array([1, 2, 3, 4]), 2, 99)
    assert list(got) == [2, 3] and int(dut.error.value) == 0
