"""The TOPK unit (hw/rtl/topk_unit.py) alone under Amaranth's Python simulator, against sim/emu.py's
``_topk`` on random SpAtten descriptors and state: random geometry (Λ ring / linear cache, windows up to
69 slots so flag runs cross beats), state sections at any 64-byte offset, positions near 2**32, random keep numerators
(0, full, anything), random pruned flags, saturating importances, bad descriptors; weight port 0 is a
byte-array memory with random stalls on every handshake. Every byte of the buffer is compared.
The kernel-level check (Verilator, the real AXI memories) is tests/test_rtl_model.py::test_topk_*."""
import random
import types

import numpy as np

from hw import isa, memmap
from hw.config import load_hw

CFG = load_hw("sim-small")
WB = CFG.port_width_bits // 8


def _run_rtl(mem, d, pos, T, seed):
    from amaranth.sim import Simulator

    from hw.rtl.topk_unit import TopkUnit
    mem = mem.copy()
    dut = TopkUnit(CFG)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    res = {}

    async def bench(ctx):
        rnd = random.Random(seed)
        ctx.set(dut.weights[0], 0)
        ctx.set(dut.position, pos)
        ctx.set(dut.n_tokens, T)
        ctx.set(dut.word, d << 96 | isa.TOPK)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        rq, wq, cur, busy_left = [], [], None, 0
        for cyc in range(200000):
            ctx.set(dut.w_cmd[0].ready, rnd.random() < 0.7)
            ctx.set(dut.ww_cmd[0].ready, rnd.random() < 0.7)
            ctx.set(dut.ww_data[0].ready, rnd.random() < 0.7)
            ctx.set(dut.ww_busy[0], bool(wq) or busy_left > 0)
            busy_left = max(0, busy_left - 1)
            if cur is None and rq:
                cur = rq.pop(0)
            give = cur is not None and rnd.random() < 0.7
            ctx.set(dut.w_data[0].valid, give)
            if give:
                ctx.set(dut.w_data[0].payload, int.from_bytes(mem[cur[0]:cur[0] + WB].tobytes(), "little"))
            if ctx.get(dut.done):
                res["status"], res["cycles"] = ctx.get(dut.status), cyc
                break
            rcmd = ctx.get(dut.w_cmd[0].valid) and ctx.get(dut.w_cmd[0].ready)
            raddr, rbeats = ctx.get(dut.w_cmd[0].payload.addr), ctx.get(dut.w_cmd[0].payload.beats)
            rtake = give and ctx.get(dut.w_data[0].ready)
            wcmd = ctx.get(dut.ww_cmd[0].valid) and ctx.get(dut.ww_cmd[0].ready)
            waddr, wbeats = ctx.get(dut.ww_cmd[0].payload.addr), ctx.get(dut.ww_cmd[0].payload.beats)
            wtake = ctx.get(dut.ww_data[0].valid) and ctx.get(dut.ww_data[0].ready)
            wdata, wstrb = ctx.get(dut.ww_data[0].payload.data), ctx.get(dut.ww_data[0].payload.strb)
            await ctx.tick()
            if rcmd:
                assert raddr % WB == 0 and rbeats > 0
                rq.append([raddr, rbeats])
            if rtake:
                cur[0] += WB
                cur[1] -= 1
                if cur[1] == 0:
                    cur = None
            if wcmd:
                assert waddr % WB == 0 and wbeats > 0
                wq.append([waddr, wbeats])
                busy_left = 5
            if wtake:
                assert wq, "write data before its command"
                a, bs = wq[0][0], wdata.to_bytes(WB, "little")
                for i in range(WB):
                    if wstrb >> i & 1:
                        mem[a + i] = bs[i]
                wq[0][0] += WB
                wq[0][1] -= 1
                if wq[0][1] == 0:
                    wq.pop(0)
        else:
            raise AssertionError("TOPK unit did not finish")
        assert not wq and not rq and cur is None, "transfers left over"

    sim.add_testbench(bench)
    sim.run()
    return res["status"], res["cycles"], mem


def _run_emu(mem, d, pos, T):
    from sim.emu import EmuDevice, Fault
    mem = mem.copy()
    try:
        EmuDevice(CFG)._topk(types.SimpleNamespace(d=d), mem, pos, T)
        return 0, mem
    except Fault as f:
        return f.code, mem


def _a64(x):
    return (x + 63) & ~63


def _case(rng, big_pos=False):
    L = int(rng.integers(1, 5))
    ring = int(rng.random() < 0.6)
    S = int(rng.integers(0, 4))
    if ring:
        Wn = int(rng.integers(1, 70))
        slots = S + Wn
    else:
        Wn, slots = int(rng.integers(0, 5)), int(rng.integers(1, 80))
    H = int(rng.integers(1, 40))

    def kq():
        r = rng.random()
        return 0 if r < 0.1 else 1 << 16 if r < 0.2 else int(rng.integers(1, 1 << 16))
    tq, hq = [kq() for _ in range(L)], [kq() for _ in range(L)]
    gap = lambda: 64 * int(rng.integers(0, 3))          # noqa: E731  (sections 64-byte aligned, any gap)
    imp_off = gap()
    dead_off = _a64(imp_off + 8 * slots) + gap()
    himp_off = _a64(dead_off + slots) + gap()
    hdead_off = _a64(himp_off + 8 * H) + gap()
    lb = _a64(hdead_off + H) + gap()
    state = 0x800 + 64 * int(rng.integers(0, 8))
    desc = 0x100 + 64 * int(rng.integers(0, 4))
    f = dict(magic=memmap.MAGIC_SPT, layers=L, start_layer=int(rng.integers(0, L)), sink=S, window=Wn, slots=slots,
             ring=ring, recent=int(rng.integers(0, 4)), heads=H, kv_heads=1, state_off=state, layer_bytes=lb,
             imp_off=imp_off, dead_off=dead_off, himp_off=himp_off, hdead_off=hdead_off)
    bad = None
    if rng.random() < 0.2:
        bad = str(rng.choice(["magic", "start", "layers", "layers0", "slots", "heads", "ring", "align"]))
        f.update({"magic": dict(magic=0x1234), "start": dict(start_layer=L), "layers": dict(layers=CFG.max_layers + 1),
                  "layers0": dict(layers=0), "slots": dict(slots=CFG.max_context + 1),
                  "heads": dict(heads=memmap.spatten_max_heads(CFG.max_hidden) + 1),
                  "ring": dict(ring=1, window=0), "align": dict(imp_off=imp_off + 8)}[bad])
    mem = rng.integers(0, 256, 1 << 15, dtype=np.uint8)
    b = memmap.SPT_HEADER.pack(*(int(f[k]) for k in memmap.SPT_FIELDS)) + np.asarray(tq + hq, "<u4").tobytes()
    mem[desc:desc + len(b)] = np.frombuffer(b, np.uint8)
    for li in range(L):
        base = state + li * lb
        imp = rng.integers(0, 1 << 20, slots).astype(np.int64)
        imp[rng.random(slots) < 0.3] = 5                                             # ties
        imp[rng.random(slots) < 0.15] = (1 << 63) - 1 - int(rng.integers(0, 1 << 20))   # saturating sums
        mem[base + imp_off: base + imp_off + 8 * slots] = imp.view(np.uint8)
        dead = (rng.random(slots) < 0.2) * rng.integers(1, 256, slots)
        mem[base + dead_off: base + dead_off + slots] = dead.astype(np.uint8)
        himp = rng.integers(0, 1 << 20, H).astype(np.int64)
        himp[rng.random(H) < 0.3] = (1 << 63) - 3
        mem[base + himp_off: base + himp_off + 8 * H] = himp.view(np.uint8)
        mem[base + hdead_off: base + hdead_off + H] = (rng.random(H) < 0.2).astype(np.uint8)
    pos = (1 << 32) - 1 - int(rng.integers(0, 40)) if big_pos else int(rng.integers(0, 3 * slots + 5))
    return mem, desc, pos, int(rng.integers(1, 5)), bad


def test_topk_unit_matches_emu_random():
    rng = np.random.default_rng(41)
    changed = 0
    for i in range(40):
        mem, desc, pos, T, bad = _case(rng, big_pos=i % 8 == 7)
        se, me = _run_emu(mem, desc, pos, T)
        sr, _cyc, mr = _run_rtl(mem, desc, pos, T, seed=i)
        diff = np.nonzero(me != mr)[0]
        assert se == sr and diff.size == 0, (i, bad, pos, T, se, sr, diff[:8])
        assert (se != 0) == (bad is not None), (i, bad, se)
        changed += int(np.count_nonzero(me != mem))
    assert changed > 0          # the cases do prune
