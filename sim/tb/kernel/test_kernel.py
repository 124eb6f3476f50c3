"""Kernel-level cocotb bench: behaves like the host (AxiLiteMaster on s_axi_control, one AxiRam
per AXI4 master with >= 100 cycles read latency and random pauses), runs programs of MATMUL
instructions over linear layers packed by hw/memmap.pack_linear, and compares every output byte
with hw/numerics.matmul. Also: bad programs (status + ap_done, never a hang) and reset mid-run."""
import os
import random

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles, RisingEdge

from hw import isa, memmap, numerics, regmap
from hw.config import load_hw
from sim.rtlsim.axi_mem import axi_ram, control_master
from sim.tb.rtlcommon.bench import record, start_clock_and_reset

CFG = load_hw(os.environ.get("ACCLLM_HW", "sim-small"), [x for x in os.environ.get("ACCLLM_HW_SET", "").split(",") if x])
P, Wb = CFG.weight_ports, CFG.port_width_bits // 8
LAT = CFG.hbm_latency_cycles
P_STALL = float(os.environ.get("P_STALL", "0.1"))
MEM = 1 << 22
ARGS = {a.name: a for a in regmap.arguments(CFG)}
PROGRAM, IO, WBASE = 0x1000, 0x10000, 0x40


class Host:
    def __init__(self, dut, p_stall=P_STALL, seed=1):
        self.dut = dut
        self.axil = control_master(dut)
        self.ctrl = axi_ram(dut, "m_axi_ctrl", MEM, LAT)
        self.w = [axi_ram(dut, f"m_axi_w{p}", MEM, LAT) for p in range(P)]
        self.rng = random.Random(seed)
        if p_stall:
            for r in [self.ctrl] + self.w:
                r.pauses(self.rng, p_stall)
        self.wtop = WBASE                     # next free weight offset (same on every port: lockstep)
        self.expected_cycles = 0

    async def setup(self):
        await start_clock_and_reset(self.dut)

    def place_linear(self, images):
        off = self.wtop
        for p, img in enumerate(images):
            self.w[p].write(off, img)
        self.wtop = memmap.align(off + max(len(i) for i in images))
        return off

    async def run(self, words: bytes, n_tokens=1, flags=0, program_len=None, work_cycles=0):
        self.ctrl.write(PROGRAM, words)
        a = self.axil
        await a.write_qword(ARGS["program"].offset, PROGRAM)
        await a.write_qword(ARGS["io"].offset, IO)
        await a.write_qword(ARGS["kv"].offset, 0)
        for p in range(P):
            await a.write_qword(ARGS[f"weights{p}"].offset, 0)
        await a.write_dword(ARGS["program_len"].offset, len(words) // 16 if program_len is None else program_len)
        await a.write_dword(ARGS["n_tokens"].offset, n_tokens)
        await a.write_dword(ARGS["position"].offset, 0)
        await a.write_dword(ARGS["flags"].offset, flags)
        await a.write_dword(regmap.AP_CTRL, regmap.AP_START)
        # bound from the work: every instruction fetch + the caller's estimate, x4 for stalls
        limit = 4 * (len(words) // 16 * (LAT + 20) + work_cycles) + 1000
        waited = 0
        while True:
            ctrl = await a.read_dword(regmap.AP_CTRL)
            if ctrl & regmap.AP_DONE:
                break
            await ClockCycles(self.dut.ap_clk, 50)
            waited += 60
            assert waited < limit, f"no ap_done after {waited} cycles (bound {limit})"
        assert ctrl & regmap.AP_IDLE
        st = await a.read_dword(ARGS["status"].offset)
        cyc = await a.read_dword(ARGS["cycles_lo"].offset) | (await a.read_dword(ARGS["cycles_hi"].offset)) << 32
        return st, cyc


def make_linear(rng: np.random.Generator, N, K, bits, group, sparse, sat=False, zero_group=False, scale_bits=CFG.scale_bits):
    qmax = (1 << bits) - 1
    G = K // group
    zeros = rng.integers(0, qmax + 1, (N, G))
    M = rng.integers(0, 1 << scale_bits, (N, G))
    SH = rng.integers(14, 30, N) if not sat else rng.integers(-8, 0, N)
    if sparse:
        idx = rng.integers(0, 6, (N, K // 4))
        idx[0, :6] = np.arange(6)                       # every pattern appears
        kept = rng.integers(0, qmax + 1, (N, K // 2))
        pat = np.asarray(memmap_patterns())
        cols = pat[idx] + (np.arange(K // 4) * 4)[None, :, None]
        codes = np.zeros((N, K), np.int64)
        mask = np.zeros((N, K), bool)
        r = np.arange(N)[:, None, None]
        codes[r, cols] = kept.reshape(N, K // 4, 2)
        mask[r, cols] = True
        if zero_group:
            kept[0, :group // 2] = zeros[0, 0]
            codes[r, cols] = kept.reshape(N, K // 4, 2)
        images = memmap.pack_linear(kept, zeros, M, SH, bits, group, idx=idx, ports=P, scale_bits=scale_bits)
    else:
        codes = rng.integers(0, qmax + 1, (N, K))
        mask = None
        if zero_group:
            codes[0, :group] = zeros[0, 0]
        images = memmap.pack_linear(codes, zeros, M, SH, bits, group, ports=P, scale_bits=scale_bits)
    return dict(N=N, K=K, bits=bits, group=group, scale_bits=scale_bits, codes=codes, zeros=zeros, M=M, SH=SH, mask=mask, images=images)


def memmap_patterns():
    from quant.pack import PATTERNS_24
    return PATTERNS_24


def x8_rows(rng, T, K, sat=False):
    x = rng.integers(-127, 128, (T, K))
    if sat:
        x[:] = 127
    ma = rng.integers(1 << 14, 1 << 15, T)
    ea = rng.integers(0, 6, T) if not sat else np.full(T, 20)
    words = ma | (ea << 16)
    buf = bytearray()
    for t in range(T):
        row = bytearray(memmap.stride8(K))
        row[0:4] = int(words[t]).to_bytes(4, "little")
        row[64:64 + K] = x[t].astype(np.int8).tobytes()
        buf += row
    return x, words, bytes(buf)


def work_estimate(lin, T):
    R = -(-lin["N"] // P)
    rec = memmap.RowRecord(lin["K"], lin["bits"], lin["group"], lin["mask"] is not None, lin["scale_bits"]).size
    per_token = 3 * LAT + R * (rec // Wb + 6) + lin["N"] * 4 // Wb + memmap.stride8(lin["K"]) // Wb + 100
    return T * per_token


async def check_matmul(host, cases, T, acc=False):
    """One program with one MATMUL per case; every output byte against numerics.matmul."""
    rng = np.random.default_rng(host.rng.randrange(1 << 30))
    prog, expect, io_top, work = [], [], IO, 0
    for c in cases:
        lin = make_linear(rng, **c)
        d = host.place_linear(lin["images"])
        x, words, xbytes = x8_rows(rng, T, lin["K"], sat=c.get("sat", False))
        src = io_top - IO
        host.ctrl.write(io_top, xbytes)
        io_top = memmap.align(io_top + len(xbytes))
        dst = io_top - IO
        s32 = memmap.stride32(lin["N"])
        old = rng.integers(-(1 << 31), 1 << 31, (T, s32 // 4)).astype("<i4") if acc else np.full((T, s32 // 4), 0x5A5A5A5A, "<i4")
        host.ctrl.write(io_top, old.tobytes())
        io_top = memmap.align(io_top + old.nbytes)
        M, SH = lin["M"], lin["SH"]
        ref = numerics.matmul(x, words, lin["codes"], lin["zeros"], M, SH, lin["group"], mask=lin["mask"],
                              dst=old[:, :lin["N"]] if acc else None)
        want = old.copy()
        want[:, :lin["N"]] = ref
        expect.append((dst, want, c))
        prog.append(isa.Instr(isa.MATMUL, a=dst, b=src, d=d, flags=isa.F_ACC if acc else 0))
        work += work_estimate(lin, T)
    prog.append(isa.Instr(isa.END))
    st, cyc = await host.run(isa.encode_program(prog), n_tokens=T, work_cycles=work)
    assert st == 0, f"status {st:#x} ({regmap.STATUS_NAMES.get(st & 0xff)}) at instruction {st >> 8}"
    for dst, want, c in expect:
        got = np.frombuffer(host.ctrl.read(IO + dst, want.nbytes), "<i4").reshape(want.shape)
        bad = np.argwhere(got != want)
        assert not len(bad), (f"{c}: {len(bad)} words differ, first at {tuple(bad[0])}: got {got[tuple(bad[0])]}, "
                              f"want {want[tuple(bad[0])]}")
    return cyc, work


@cocotb.test()
async def matmul_dense_w2_w4_w8(dut):
    host = Host(dut, seed=11)
    await host.setup()
    cases = [dict(N=10, K=128, bits=2, group=64, sparse=False),
             dict(N=7, K=256, bits=4, group=32, sparse=False),
             dict(N=5, K=96, bits=8, group=32, sparse=False),
             dict(N=4, K=192, bits=2, group=16, sparse=False, zero_group=True),
             dict(N=3, K=64, bits=8, group=64, sparse=False)]
    await check_matmul(host, cases, T=1)


@cocotb.test()
async def matmul_sparse_24(dut):
    host = Host(dut, seed=12)
    await host.setup()
    cases = [dict(N=6, K=192, bits=2, group=64, sparse=True, zero_group=True),
             dict(N=5, K=128, bits=4, group=16, sparse=True),
             dict(N=3, K=64, bits=8, group=32, sparse=True),
             dict(N=6, K=256, bits=2, group=16, sparse=True),
             dict(N=5, K=128, bits=4, group=64, sparse=False)]
    await check_matmul(host, cases, T=1)


@cocotb.test()
async def matmul_matrix_matrix_acc_and_saturation(dut):
    host = Host(dut, seed=13)
    await host.setup()
    await check_matmul(host, [dict(N=9, K=128, bits=2, group=64, sparse=False),
                              dict(N=4, K=64, bits=4, group=32, sparse=True)], T=3, acc=True)
    await check_matmul(host, [dict(N=6, K=128, bits=8, group=128, sparse=False, sat=True),
                              dict(N=4, K=128, bits=2, group=64, sparse=True, sat=True)], T=1)


@cocotb.test()
async def matmul_largest_k(dut):
    host = Host(dut, seed=14)
    await host.setup()
    await check_matmul(host, [dict(N=4, K=CFG.max_hidden, bits=2, group=64, sparse=False),
                              dict(N=2, K=CFG.max_hidden, bits=8, group=128, sparse=True)], T=1)


@cocotb.test()
async def bad_programs(dut):
    host = Host(dut, seed=15)
    await host.setup()
    rng = np.random.default_rng(3)
    lin = make_linear(rng, 4, 64, 2, 64, False)
    d = host.place_linear(lin["images"])
    end = isa.encode(isa.Instr(isa.END))
    nop = isa.encode(isa.Instr(isa.NOP))
    # unknown opcode at index 1
    st, _ = await host.run(nop + bytes([0x77]) + bytes(15) + end)
    assert st == regmap.STATUS_BAD_OPCODE | (1 << 8), f"{st:#x}"
    # a reserved field set (NOP with a != 0) at index 0
    st, _ = await host.run(bytes([isa.NOP, 0, 0, 0, 1]) + bytes(11) + end)
    assert st == regmap.STATUS_BAD_OPCODE, f"{st:#x}"
    # no END: runs past program_len
    st, _ = await host.run(nop + nop, program_len=2)
    assert st == regmap.STATUS_NO_END | (2 << 8), f"{st:#x}"
    # address outside the io buffer's offset space
    mm = isa.encode(isa.Instr(isa.MATMUL, a=0, b=0xFFFFFFC0, d=d))     # X8 row (128 B) past 4 GiB
    st, _ = await host.run(nop + mm + end, work_cycles=1000)
    assert st == regmap.STATUS_ADDR_RANGE | (1 << 8), f"{st:#x}"
    # not a linear descriptor (points at padding)
    mm = isa.encode(isa.Instr(isa.MATMUL, a=0, b=0, d=host.wtop))
    st, _ = await host.run(mm + end, work_cycles=1000)
    assert st == regmap.STATUS_SHAPE, f"{st:#x}"
    # scale mantissas of the width this build was not made for (the compiler packs cfg.scale_bits)
    other = make_linear(rng, 4, 64, 2, 64, False, scale_bits=24 - CFG.scale_bits)
    mm = isa.encode(isa.Instr(isa.MATMUL, a=0, b=0, d=host.place_linear(other["images"])))
    st, _ = await host.run(mm + end, work_cycles=1000)
    assert st == regmap.STATUS_SHAPE, f"{st:#x}"
    # a legal, correct program still runs after all that
    await check_matmul(host, [dict(N=4, K=64, bits=2, group=64, sparse=False)], T=1)


@cocotb.test()
async def reset_mid_run(dut):
    host = Host(dut, seed=16)
    await host.setup()
    rng = np.random.default_rng(5)
    lin = make_linear(rng, 64, 512, 2, 64, False)
    d = host.place_linear(lin["images"])
    await host.axil.write_dword(ARGS["program_len"].offset, 2)
    host.ctrl.write(PROGRAM, isa.encode_program([isa.Instr(isa.MATMUL, a=0x8000, b=0, d=d), isa.Instr(isa.END)]))
    await host.axil.write_qword(ARGS["program"].offset, PROGRAM)
    await host.axil.write_qword(ARGS["io"].offset, IO)
    await host.axil.write_dword(ARGS["n_tokens"].offset, 1)
    await host.axil.write_dword(regmap.AP_CTRL, regmap.AP_START)
    await ClockCycles(dut.ap_clk, 3 * LAT)          # mid-way: weights streaming
    assert not (await host.axil.read_dword(regmap.AP_CTRL)) & regmap.AP_IDLE
    dut.ap_rst_n.value = 0
    await ClockCycles(dut.ap_clk, 8)
    dut.ap_rst_n.value = 1
    await RisingEdge(dut.ap_clk)
    ctrl = await host.axil.read_dword(regmap.AP_CTRL)
    assert ctrl & regmap.AP_IDLE and not ctrl & (regmap.AP_START | regmap.AP_DONE), f"after reset {ctrl:#x}"
    await check_matmul(host, [dict(N=5, K=128, bits=4, group=32, sparse=False)], T=2)


@cocotb.test()
async def stream_efficiency(dut):
    """Weight-port beats per cycle during a large matrix-vector product (the bench's number)."""
    for p_stall, key in ((0.0, "kernel_stream_efficiency"), (0.2, "kernel_stream_efficiency_backpressure")):
        host = Host(dut, p_stall=p_stall, seed=17)
        await host.setup()
        first, last, beats = [None], [0], [0]
        cycle = [0]
        ar_at, r_at = [None], [None]       # first AR handshake and first R beat on w0: the memory's latency

        async def monitor():
            while True:
                await RisingEdge(dut.ap_clk)
                cycle[0] += 1
                if ar_at[0] is None and int(dut.m_axi_w0_arvalid.value) and int(dut.m_axi_w0_arready.value):
                    ar_at[0] = cycle[0]
                if int(dut.m_axi_w0_rvalid.value) and int(dut.m_axi_w0_rready.value):
                    if r_at[0] is None:
                        r_at[0] = cycle[0]
                    beats[0] += 1
                    if beats[0] == 64 // Wb + 1:        # first beat of the stream (after the descriptor)
                        first[0] = cycle[0]
                    last[0] = cycle[0]
        mon = cocotb.start_soon(monitor())
        K, N = CFG.max_hidden, 8 * P
        cyc, work = await check_matmul(host, [dict(N=N, K=K, bits=2, group=64, sparse=False)], T=1)
        mon.cancel()
        beats[0] -= 64 // Wb
        eff = beats[0] / (last[0] - first[0] + 1)
        dut._log.info(f"W2 {N}x{K}, p_stall {p_stall}: {beats[0]} beats on w0 in {last[0] - first[0] + 1} cycles "
                      f"-> {eff:.3f} of the port peak; whole run {cyc} cycles")
        record(key, round(eff, 4))
        record(key + "_run_cycles", cyc)
        if p_stall == 0.0:
            record("matmul_case", dict(N=N, K=K, bits=2, group=64, sparse=False, T=1))
            record("read_latency_cycles", r_at[0] - ar_at[0])
