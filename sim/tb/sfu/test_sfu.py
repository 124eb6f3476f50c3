"""cocotb bench of the special-function unit (hw.rtl.sfu.SFU) against hw/numerics.py: every output
element must be identical (random rows and the numerics' edge cases), with random stalls on
every stream."""
import os
import random

import cocotb
import numpy as np

from hw import numerics as nx
from hw.rtl.sfu import OP_ADD, OP_ARGMAX, OP_QUANT, OP_RMSNORM, OP_ROPE, OP_SILUMUL, OP_SOFTMAX
from sim.tb.sfu.streams import Stream, pulse, reset

MAX_D = int(os.environ.get("MAX_D", "256"))
MAX_HD = int(os.environ.get("MAX_HD", "64"))
MAX_N = int(os.environ.get("MAX_N", "128"))
P = float(os.environ.get("P_STALL", "0.25"))


async def run_op(dut, op, a, b=None, n=None, n_out=None, quant=0, e40=0, pos=0, seed=0):
    rng = random.Random(seed)
    si, sb, so = Stream(dut, "i"), Stream(dut, "b"), Stream(dut, "o")
    n = len(a) if n is None else n
    await pulse(dut, op=op, n=n, quant=quant, e40=e40, pos=pos)
    send = cocotb.start_soon(si.send(a, rng, 1 - P))
    if b is not None:
        cocotb.start_soon(sb.send(b, random.Random(seed + 1), 1 - P))
    out = await so.recv(n_out, random.Random(seed + 2), 1 - P, limit=40 * (len(a) + 300))
    await send
    return np.array(out, dtype=np.int64)


def x8(codes_word):
    return np.array(codes_word[:-1]), int(codes_word[-1]) & 0xFFFFFFFF


def check(name, got, want):
    want = np.asarray(want, np.int64).reshape(-1)
    got = np.asarray(got, np.int64).reshape(-1)
    bad = np.nonzero(got != want)[0]
    assert not len(bad), f"{name}: {len(bad)} mismatches, first at {bad[0]}: got {got[bad[0]]} want {want[bad[0]]}"


def rows(rng, d):
    yield rng.integers(-(1 << 20), 1 << 20, d)
    yield rng.integers(-(1 << 31), (1 << 31), d)                # full range
    yield np.zeros(d, np.int64)                                 # all zeros
    yield np.full(d, -(1 << 31), np.int64)                      # most negative
    yield (rng.standard_normal(d) * 3000).astype(np.int64)      # small values
    yield np.array([(1 << 31) - 1] + [0] * (d - 1), np.int64)   # one spike


@cocotb.test()
async def quant_rows(dut):
    await reset(dut)
    rng = np.random.default_rng(1)
    for k, x in enumerate(rows(rng, MAX_D)):
        out = await run_op(dut, OP_QUANT, x, n_out=len(x) + 1, seed=k)
        codes, word = x8(out)
        wc, ww = nx.act_quant(x[None, :])
        check(f"quant row {k} codes", codes, wc)
        assert word == int(ww[0]), f"quant row {k}: word {word:#x} != {int(ww[0]):#x}"


@cocotb.test()
async def rmsnorm_rows(dut):
    await reset(dut)
    rng = np.random.default_rng(2)
    for k, x in enumerate(rows(rng, MAX_D)):
        d = len(x) if k % 2 == 0 else len(x) - 3
        x = x[:d]
        gamma = rng.integers(-(3 << 16), 3 << 16, d)
        e40 = int(round(1e-5 * 2 ** 40)) if k != 2 else int(round(1e-6 * 2 ** 40))
        want = nx.rmsnorm(x[None, :], gamma, e40)
        out = await run_op(dut, OP_RMSNORM, x, gamma, n_out=d, e40=e40, seed=10 + k)
        check(f"rmsnorm row {k}", out, want)
        out = await run_op(dut, OP_RMSNORM, x, gamma, n_out=d + 1, quant=1, e40=e40, seed=20 + k)
        codes, word = x8(out)
        wc, ww = nx.act_quant(want)
        check(f"rmsnorm+quant row {k}", codes, wc)
        assert word == int(ww[0])


@cocotb.test()
async def silumul_and_add(dut):
    await reset(dut)
    rng = np.random.default_rng(3)
    d = MAX_D
    gate = rng.integers(-(20 << 16), 20 << 16, d)
    gate[:6] = [-(1 << 31), (1 << 31) - 1, -(16 << 16), (16 << 16) - 1, 16 << 16, 0]
    up = rng.integers(-(1 << 24), 1 << 24, d)
    up[6] = (1 << 31) - 1
    want = nx.silu_mul(gate, up)
    out = await run_op(dut, OP_SILUMUL, gate, up, n_out=d, seed=30)
    check("silumul", out, want)
    out = await run_op(dut, OP_SILUMUL, gate, up, n_out=d + 1, quant=1, seed=31)
    codes, word = x8(out)
    wc, ww = nx.act_quant(want[None, :])
    check("silumul+quant", codes, wc)
    assert word == int(ww[0])
    a = rng.integers(-(1 << 31), 1 << 31, d)
    b = rng.integers(-(1 << 31), 1 << 31, d)
    out = await run_op(dut, OP_ADD, a, b, n_out=d, seed=32)
    check("add (saturating)", out, nx.add_sat(a, b))


@cocotb.test()
async def rope_heads(dut):
    await reset(dut)
    rng = np.random.default_rng(4)
    hd = MAX_HD
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    F = nx.rope_freq_words(inv_freq)
    for k, pos in enumerate([0, 1, 7, 2047, 123456, (1 << 32) - 1]):
        x = rng.integers(-(1 << 31), 1 << 31, hd) if k % 2 else rng.integers(-(1 << 22), 1 << 22, hd)
        C, S = nx.rope_cos_sin(pos, F)
        want = nx.rope(x, C, S)
        out = await run_op(dut, OP_ROPE, x, F, n_out=hd, pos=pos, seed=40 + k)
        check(f"rope pos {pos}", out, want)


@cocotb.test()
async def softmax_rows(dut):
    await reset(dut)
    rng = np.random.default_rng(5)
    n = MAX_N
    cases = {
        "random": rng.integers(-(20 << 16), 20 << 16, n),
        "equal": np.full(n, 12345, np.int64),
        "huge negative": np.concatenate([[0, 5 << 16], np.full(n - 2, -(1 << 31))]),
        "one": np.array([-(1 << 31)]),
        "spread": rng.integers(-(1 << 31), (1 << 31), n),
        "short": rng.integers(-(4 << 16), 4 << 16, 3),
    }
    for k, (name, s) in enumerate(cases.items()):
        out = await run_op(dut, OP_SOFTMAX, s, n_out=len(s), seed=50 + k)
        check(f"softmax {name}", out, nx.softmax_q24(s))


@cocotb.test()
async def argmax_ties(dut):
    await reset(dut)
    rng = np.random.default_rng(6)
    for k, x in enumerate([rng.integers(-100, 100, 1000), np.full(50, 7), np.array([-(1 << 31)] * 5 + [3, 3]),
                           rng.integers(-(1 << 31), 1 << 31, 777)]):
        out = await run_op(dut, OP_ARGMAX, x, n_out=1, seed=60 + k)
        assert int(out[0]) == int(nx.argmax_first(x)), f"argmax case {k}: {out[0]} != {nx.argmax_first(x)}"
