"""Issue 7, kernel level: programs of the row-operation units (EMBED, RMSNORM, QUANT, SILUMUL, ADD,
ARGMAX) on the RTL kernel under Verilator, every io byte compared with the functional model
(sim/emu.py) on the same program and buffers; bad input gives the same status code."""
import numpy as np
import pytest

from hw import isa, memmap, numerics as nx, regmap
from hw.config import load_hw

pytest.importorskip("cocotb")

CFG = load_hw("sim-small")
P = CFG.weight_ports


@pytest.fixture(scope="module")
def pair():
    from sim.tb.model.harness import DevicePair
    p = DevicePair(CFG)
    yield p
    p.close()


def _x32_rows(rng, T, D, amp=1 << 20):
    st = memmap.stride32(D)
    buf = np.zeros((T, st // 4), np.int32)
    buf[:, :D] = rng.integers(-amp, amp, (T, D))
    return buf


def _fresh_io(pair, rng):
    io = rng.integers(0, 256, 1 << 16, dtype=np.uint8)    # random everywhere: untouched bytes are checked too
    pair.upload("io", io)


def _same(out, what):
    e, r = out["emu"], out["rtl"]
    # the index is meaningful only for a failure (emu reports the END word's index on success)
    assert r[0] == e[0] and (e[0] == 0 or r[1] == e[1]), f"{what}: status rtl={r[:2]} emu={e[:2]}"
    a, b = np.frombuffer(e[2], np.uint8), np.frombuffer(r[2], np.uint8)
    diff = np.nonzero(a != b)[0]
    assert diff.size == 0, f"{what}: {diff.size} io bytes differ, first at {diff[:8]} emu={a[diff[:8]]} rtl={b[diff[:8]]}"
    return e


def test_row_ops_bit_exact(pair):
    rng = np.random.default_rng(7)
    T = 3
    for D in (64, 40):
        _fresh_io(pair, rng)
        x = _x32_rows(rng, T, D)
        x[0, :D] = 0                                   # RMSNorm of zeros / QUANT of zeros
        x[1, 0] = (1 << 31) - 1                        # a saturating add
        y = _x32_rows(rng, T, D)
        y[1, 0] = 1 << 30
        gu = _x32_rows(rng, T, 2 * D, amp=1 << 19)
        pair.upload("io", x, 0x0)
        pair.upload("io", y, 0x1000)
        pair.upload("io", gu, 0x2000)
        gamma = rng.integers(-(1 << 17), 1 << 17, D)
        pair.upload("weights0", memmap.pack_norm(gamma, 1e-5), 0x400)
        prog = [isa.Instr(isa.QUANT, a=0x4000, b=0x0, c=D),
                isa.Instr(isa.RMSNORM, a=0x5000, b=0x0, c=D, d=0x400),
                isa.Instr(isa.RMSNORM, a=0x5800, b=0x1000, c=D, d=0x400),
                isa.Instr(isa.SILUMUL, a=0x6000, b=0x2000, c=D),
                isa.Instr(isa.ADD, a=0x1000, b=0x0, c=D),
                isa.Instr(isa.END)]
        e = _same(pair.run(prog, T), f"row ops D={D}")
        assert e[0] == regmap.STATUS_OK


def test_embed_and_argmax_bit_exact(pair):
    rng = np.random.default_rng(8)
    T, V, D = 4, 300, 64
    _fresh_io(pair, rng)
    table = rng.integers(-(1 << 20), 1 << 20, (V, D))
    imgs = memmap.pack_embedding(table, P)
    for p in range(P):
        pair.upload(f"weights{p}", np.frombuffer(imgs[p], np.uint8), 0x800)
    ids = np.array([0, V - 1, 151, 150], np.int32)     # both ports, first and last rows
    pair.upload("io", ids, 0x0)
    logits = _x32_rows(rng, T, V)
    logits[T - 1, 17] = logits[T - 1, 200] = (1 << 30)   # tie: lowest index wins
    pair.upload("io", logits, 0x3000)
    prog = [isa.Instr(isa.EMBED, a=0x100, b=0x0, c=D, d=0x800),
            isa.Instr(isa.ARGMAX, a=0x40, b=0x3000, d=V),
            isa.Instr(isa.END)]
    e = _same(pair.run(prog, T, flags=isa.RF_ARGMAX), "embed + argmax")
    assert np.frombuffer(e[2], np.int32)[0x40 // 4] == 17
    _same(pair.run(prog, T, flags=0), "argmax skipped without the flag")


def test_row_ops_bad_input(pair):
    rng = np.random.default_rng(9)
    _fresh_io(pair, rng)
    table = rng.integers(-(1 << 20), 1 << 20, (10, 64))
    imgs = memmap.pack_embedding(table, P)
    for p in range(P):
        pair.upload(f"weights{p}", np.frombuffer(imgs[p], np.uint8), 0x800)
    pair.upload("io", np.array([3, 10], np.int32), 0x0)        # id 10 is outside the 10-row table
    cases = {
        "width beyond max_hidden": ([isa.Instr(isa.QUANT, a=0x4000, b=0, c=CFG.max_hidden + 1)], regmap.STATUS_SHAPE),
        "width 0": ([isa.Instr(isa.ADD, a=0x4000, b=0, c=0)], regmap.STATUS_SHAPE),
        "embed width mismatch": ([isa.Instr(isa.EMBED, a=0x100, b=0, c=32, d=0x800)], regmap.STATUS_SHAPE),
        "token id outside the table": ([isa.Instr(isa.EMBED, a=0x100, b=0, c=64, d=0x800)], regmap.STATUS_ADDR_RANGE),
    }
    for what, (prog, code) in cases.items():
        out = pair.run([isa.Instr(isa.NOP)] + prog + [isa.Instr(isa.END)], 2)
        e = _same(out, what)
        assert (e[0], e[1]) == (code, 1), what
