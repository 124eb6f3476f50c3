"""cocotb bench of the KV-cache unit (hw.rtl.kvcache.KVCacheUnit) against hw/numerics.py (key and
value 4-bit quantization, value dequantization) and the slot rule of sim/emu.py (ring-buffer wrap at
the window edge, sinks never evicted, linear cache, bad regions and positions)."""
import random

import cocotb
from cocotb.triggers import ClockCycles
import numpy as np

from hw import numerics as nx
from hw import regmap
from hw.rtl.kvcache import kept_slots, kv_slot
from sim.tb.sfu.streams import Stream, pulse, reset, wait_idle


@cocotb.test()
async def key_quant(dut):
    await reset(dut)
    rng = np.random.default_rng(11)
    hd, hkv = 64, 2
    ks = (rng.random((hkv, hd)) * 0.5 + 1e-3).astype(np.float16)
    kz = rng.integers(0, 16, (hkv, hd)).astype(np.float64)
    kc = nx.key_consts(ks, kz, hd)
    k = np.concatenate([rng.integers(-(1 << 31), 1 << 31, (2, hkv, hd)),
                        (rng.standard_normal((6, hkv, hd)) * (1 << 16)).astype(np.int64)]).reshape(-1, hd)
    want = nx.key_quant(k.reshape(-1, hkv, hd), kc["RK"], kc["KS"], kc["KZ"]).reshape(-1)
    consts = (kc["RK"] | (kc["KS"] << 32) | (kc["KZ"] << 40)).reshape(-1)
    cw = np.tile(consts, k.size // consts.size)
    si, sc, so = Stream(dut, "kq_i"), Stream(dut, "kq_c", 48), Stream(dut, "kq_o", 4)
    cocotb.start_soon(si.send(k.reshape(-1), random.Random(1), 0.8))
    cocotb.start_soon(sc.send(cw, random.Random(2), 0.8))
    got = np.array(await so.recv(k.size, random.Random(3), 0.8, signed=False))
    bad = np.nonzero(got != want)[0]
    assert not len(bad), f"key codes: {len(bad)} mismatches, first {bad[0]}: {got[bad[0]]} != {want[bad[0]]}"


@cocotb.test()
async def value_quant_dequant(dut):
    await reset(dut)
    rng = np.random.default_rng(12)
    for group in (32, 64, 16):
        dut.vq_group.value = group
        rows = [rng.integers(-(1 << 31), 1 << 31, group), np.zeros(group, np.int64),
                np.full(group, 5 << 16), np.full(group, -(1 << 31)), (rng.standard_normal(group) * 3e4).astype(np.int64),
                rng.integers(0, 1 << 20, group), np.array([(1 << 31) - 1] + [-(1 << 31)] * (group - 1))]
        v = np.stack(rows)
        codes, words = nx.value_quant(v, group)
        si, so = Stream(dut, "vq_i"), Stream(dut, "vq_o", 32)
        cocotb.start_soon(si.send(v.reshape(-1), random.Random(group), 0.8))
        got = np.array(await so.recv(v.size + len(rows), random.Random(group + 1), 0.8, signed=False)).reshape(len(rows), -1)
        for r in range(len(rows)):
            assert np.array_equal(got[r, :group], codes[r, :]), f"group {group} row {r}: value codes differ"
            assert got[r, group] == int(words[r, 0]) & 0xFFFFFFFF, f"group {group} row {r}: word {got[r, group]:#x} != {int(words[r, 0]):#x}"
        # dequantization of what was just quantized (and of random codes with the same words)
        want = nx.value_dequant(codes, words, group).reshape(-1)
        rc = rng.integers(0, 16, codes.shape)
        want2 = nx.value_dequant(rc, words, group).reshape(-1)
        wrep = np.repeat(words.reshape(-1) & 0xFFFFFFFF, group)
        di, do = Stream(dut, "vd_i", 36), Stream(dut, "vd_o")
        cocotb.start_soon(di.send(np.concatenate([codes.reshape(-1) | (wrep << 4), rc.reshape(-1) | (wrep << 4)]),
                                  random.Random(5), 0.8))
        got = np.array(await do.recv(2 * v.size, random.Random(6), 0.8))
        assert np.array_equal(got[:v.size], want), f"group {group}: dequantized values differ"
        assert np.array_equal(got[v.size:], want2), f"group {group}: dequantized random codes differ"


async def slots_of(dut, pos, S, W, slots, ring):
    await pulse(dut, pos=pos, sink=S, window=W, slots=slots, ring=int(ring))
    so = Stream(dut, "addr_o", 17)
    await ClockCycles(dut.clk, 2)  # status is set the cycle after start
    st = int(dut.status.value)
    if st:
        return st, None, []
    n = len(kept_slots(pos, S, W, ring))
    got = await so.recv(n, random.Random(pos), 0.7, limit=20 * n + 100, signed=False)
    await wait_idle(dut, 20)
    return 0, int(dut.append.value), [(g & 0xFFFF, bool(g >> 16)) for g in got]


@cocotb.test()
async def ring_buffer_addressing(dut):
    await reset(dut)
    S, W = 4, 8
    # every position up to well past several wraps, including the window edges
    for pos in list(range(0, 3 * (S + W) + 3)) + [1000, 1001, 1003, 65537]:
        st, app, got = await slots_of(dut, pos, S, W, S + W, True)
        assert st == 0
        assert app == kv_slot(pos, S, W), f"pos {pos}: append slot {app} != {kv_slot(pos, S, W)}"
        assert got == kept_slots(pos, S, W), f"pos {pos}: kept {got} != {kept_slots(pos, S, W)}"
        assert [s for s, sink in got if sink] == list(range(min(S, pos + 1))), "a sink was evicted"
    # no sinks (pure sliding window) and a linear cache
    for pos in (0, 5, 7, 8, 9, 30):
        st, app, got = await slots_of(dut, pos, 0, 8, 8, True)
        assert (st, app, got) == (0, kv_slot(pos, 0, 8), kept_slots(pos, 0, 8))
    for pos in (0, 3, 15):
        st, app, got = await slots_of(dut, pos, 0, 16, 16, False)
        assert (st, app, got) == (0, pos, kept_slots(pos, 0, 16, False))


@cocotb.test()
async def bad_region_and_position(dut):
    await reset(dut)
    st, _, _ = await slots_of(dut, 16, 0, 16, 16, False)
    assert st == regmap.STATUS_POSITION, f"linear cache position 16 of 16 slots: status {st}"
    st, _, _ = await slots_of(dut, 3, 4, 8, 10, True)
    assert st == regmap.STATUS_KV_REGION, f"S + W = 12 in a 10-slot region: status {st}"
    st, _, _ = await slots_of(dut, 3, 0, 0, 0, True)
    assert st == regmap.STATUS_KV_REGION
    st, _, _ = await slots_of(dut, 3, 4, 5000, 5004, True)
    assert st == regmap.STATUS_KV_REGION, "slots beyond max_context"
    st, app, got = await slots_of(dut, 20, 4, 8, 12, True)      # the unit recovers after errors
    assert st == 0 and got == kept_slots(20, 4, 8)
