"""The matrix engine: W2/W4/W8 codes x int8 activations, dense and 2:4, exactly hw/numerics.py.

Input: the weight ports' byte streams in the layout of hw/memmap.py (``pack_linear``): port p holds
rows [p*R, (p+1)*R) as back-to-back records ``[SH int8][M: G x u16][zeros: G b-bit][2:4 idx:
K/4 3-bit][codes]`` (all packed LSB-first, every section padded to SEC_ALIGN = 16 bytes). Every port
has the same record structure, so one controller consumes all ports in lockstep; a gearbox per port
(a ring of two beats, read through one rotation in 16-byte steps) realigns each section to its start:

* SH: 16 bytes (the first is the row's shift); scales / zeros / idx: up to W/8 bytes per cycle into per-port
  section memories (row i of a memory = bytes [i*W/8, (i+1)*W/8) of the section);
* codes: W/8 bytes per cycle (dense: C = W/b columns) or W/16 bytes (2:4: W/(2b) kept codes =
  C columns), i.e. one *code step* of C columns per cycle on every port.

Per code step and port (16-column chunks; every chunk lies in one group since group >= 16):
  P_j = sum code*x, S_j = sum x over the kept columns < K;  t_j = P_j - zero*S_j
  acc += sum_j t_j * M_j   (exact: the sum of t over a group is numerics.group_sums' G[n, g])
and at the end of a record the P sums go through a small FIFO to one shared finisher, a port per
cycle: out = shift_sat32(sat48(acc) * ma, SH - ea) (numerics.matmul_finish), into the output memory
(int32 word n = row n, rows of W/32 words), from which the kernel writes back (with F_ACC's
saturating add).
"""
from __future__ import annotations

from amaranth import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from algo.common import AccllmError
from hw.memmap import SEC_ALIGN

CHUNK = 16
MIN_GROUP = 16
OUT_WORDS = 1 << 16          # rows one MATMUL may produce (>= every vocabulary we target)
PATTERNS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
BITS_SEL = {2: 0, 4: 1, 8: 2}
SEC_SH, SEC_SC, SEC_ZE, SEC_IX, SEC_CO = range(5)


def _lg(n: int) -> int:
    if n <= 0 or n & (n - 1):
        raise AccllmError(f"{n} must be a power of two")
    return n.bit_length() - 1


def sat_const(m: Module, v, bits: int, name: str):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    out = Signal(signed(bits), name=name)
    m.d.comb += out.eq(Mux(v > hi, hi, Mux(v < lo, lo, v)))
    return out


def shift_sat32(m: Module, y, r, name: str):
    """numerics.shift_sat32 for one value: y * 2**-r, round half up for r > 0, left shift of the
    int32-clamped y for r <= 0, saturated to int32."""
    rs = Signal(range(63), name=f"{name}_rs")
    ls = Signal(range(32), name=f"{name}_ls")
    m.d.comb += [rs.eq(Mux(r > 62, 62, Mux(r > 0, r, 0))), ls.eq(Mux(r < -31, 31, Mux(r < 0, -r, 0)))]
    half = Signal(signed(66), name=f"{name}_half")
    m.d.comb += half.eq((Const(1, unsigned(64)) << rs) >> 1)     # 2**(rs-1), 0 for rs == 0
    right = Signal(signed(66), name=f"{name}_right")
    m.d.comb += right.eq((y + half) >> rs)
    yc = sat_const(m, y, 32, f"{name}_yc")
    left = Signal(signed(64), name=f"{name}_left")
    m.d.comb += left.eq(yc << ls)
    v = Signal(signed(66), name=f"{name}_v")
    m.d.comb += v.eq(Mux(r > 0, right, left))
    return sat_const(m, v, 32, name)


def lane_product(code, x):
    """code (unsigned, 2/4/8 bits) x x (int8). The W2-only lanes (half of them) multiply by shift-and-
    add in LUTs; the lanes that see W4 or W8 codes keep a multiplier (a DSP48E2: yosys maps every
    product of 9 bits or more to one). All lanes on DSPs would put 256 DSPs on every 512-bit weight
    port, more than the U280 has for 32 ports; W2 lanes on DSPs too would cost 128 per port for
    ~15 LUTs each, W4 lanes in LUTs ~42 LUTs each (measured with yosys synth_xilinx)."""
    if len(code) >= 4:
        return code * x
    return sum(Mux(code[k], x << k, 0) for k in range(len(code)))


def _window(row, blk, bits: int, width: int):
    """Window number blk[:bits] of *width* bits of *row* (the whole row when it holds one window)."""
    if bits <= 0:
        return row[:width]
    return row.word_select(blk[:bits], width)


class MatrixEngine(wiring.Component):
    def __init__(self, ports: int, data_w: int, max_k: int, out_words: int = OUT_WORDS, scale_bits: int | None = None):
        """scale_bits: 8 or 16 builds the scale path for that mantissa width only (the kernel rejects
        other descriptors; a u280 build saves ~0.8K LUTs per port), None for both (``scale8`` input)."""
        if scale_bits not in (None, 8, 16):
            raise AccllmError(f"scale_bits must be 8, 16 or None (both), got {scale_bits}")
        self.scale_bits = scale_bits
        self.P, self.W = ports, data_w
        _lg(ports)
        self.lgW = _lg(data_w)
        self.Wb = data_w // 8
        if self.Wb % SEC_ALIGN:
            raise AccllmError(f"port width {data_w} bits is not a multiple of the {SEC_ALIGN}-byte record sections")
        self.L = data_w // 2                   # lanes (columns per code step at W2)
        self.NCH = self.L // CHUNK             # chunks per code step at W2
        self.E = data_w // 32                  # int32 words per output row
        self.max_k = max_k
        if max_k % self.L:
            raise AccllmError(f"max_hidden {max_k} must be a multiple of {self.L}")
        self.x_rows = max_k // self.L          # x memory: rows of L int8 (4 beats each)
        g_max = max_k // MIN_GROUP
        self.sc_rows = max(2, -(-2 * g_max // self.Wb))
        self.ze_rows = max(2, -(-g_max // self.Wb))
        self.ix_rows = max(2, -(-(3 * max_k // 32) // self.Wb) + 1)
        self.out_words = out_words
        self.o_rows = out_words // self.E
        super().__init__({
            "w": In(stream.Signature(data_w)).array(ports),
            "start": In(1), "busy": Out(1),
            "bits_sel": In(2), "sparse": In(1), "lg_group": In(5), "scale8": In(1), "k": In(32), "rows": In(32),
            "ma": In(16), "ea": In(8),
            "x_we": In(1), "x_addr": In(range(max(2, 4 * self.x_rows))), "x_data": In(data_w),
            "o_raddr": In(range(max(2, self.o_rows))), "o_ren": In(1), "o_rdata": Out(data_w),
            "consumed": Out(32),               # beats taken per port during this run (for the bench)
        })

    def elaborate(self, platform):
        m = Module()
        P, W, Wb, L, NCH, E = self.P, self.W, self.Wb, self.L, self.NCH, self.E

        # ---- activation memory (rows of L int8), written by the kernel's loader one beat at a time
        m.submodules.xmem = xmem = memory.Memory(shape=unsigned(4 * W), depth=self.x_rows, init=[])
        xw = xmem.write_port(granularity=W)
        xr = xmem.read_port()
        m.d.comb += [xw.addr.eq(self.x_addr >> 2), xw.data.eq(Cat(*([self.x_data] * 4))),
                     xw.en.eq(Mux(self.x_we, 1 << self.x_addr[:2], 0))]
        # ---- output memory (rows of E int32 words)
        m.submodules.omem = omem = memory.Memory(shape=unsigned(W), depth=self.o_rows, init=[])
        ow = omem.write_port(granularity=32)
        orp = omem.read_port()
        m.d.comb += [orp.addr.eq(self.o_raddr), orp.en.eq(self.o_ren), self.o_rdata.eq(orp.data)]

        # ---- run parameters (latched at start)
        bits_sel, sparse, lg_g, lg_b = Signal(2), Signal(), Signal(5), Signal(2)
        scale8 = Signal()                      # 8-bit scale mantissas (1 byte per group) instead of 16
        K, rows = Signal(32), Signal(32)
        ma, ea = Signal(16), Signal(8)
        lg_c = Signal(4)                       # log2 columns per code step
        sec_bytes = [Signal(32, name=f"sec_bytes{i}") for i in range(5)]
        running = Signal()
        lgb_now = Signal(2)
        m.d.comb += lgb_now.eq(self.bits_sel + 1)

        def padded(nbytes):                    # section sizes are padded to SEC_ALIGN (hw/memmap.RowRecord)
            return ((nbytes + SEC_ALIGN - 1) >> _lg(SEC_ALIGN)) << _lg(SEC_ALIGN)

        with m.If(self.start):
            g = self.k >> self.lg_group
            m.d.sync += [bits_sel.eq(self.bits_sel), sparse.eq(self.sparse), lg_g.eq(self.lg_group),
                         lg_b.eq(lgb_now), lg_c.eq(self.lgW - lgb_now), K.eq(self.k), rows.eq(self.rows),
                         ma.eq(self.ma), ea.eq(self.ea), running.eq(self.rows != 0), self.consumed.eq(0),
                         scale8.eq(self.scale8),
                         sec_bytes[SEC_SH].eq(SEC_ALIGN), sec_bytes[SEC_SC].eq(padded(Mux(self.scale8, g, g << 1))),
                         sec_bytes[SEC_ZE].eq(padded(((g << lgb_now) + 7) >> 3)),
                         sec_bytes[SEC_IX].eq(padded((3 * (self.k >> 2) + 7) >> 3)),
                         sec_bytes[SEC_CO].eq(padded((((self.k >> self.sparse) << lgb_now) + 7) >> 3))]

        # ---- record controller (shared by all ports)
        sec = Signal(3)
        rem = Signal(32)                       # bytes left in the section
        srow = Signal(16)                      # step within the section
        rec = Signal(32)                       # record (row group) index
        sh = [Signal(signed(8), name=f"sh{p}") for p in range(P)]
        n = Signal(range(Wb + 1))              # bytes consumed by this step
        cap = Signal(range(Wb + 1))
        m.d.comb += cap.eq(Mux(sec == SEC_SH, SEC_ALIGN, Mux((sec == SEC_CO) & sparse, Wb // 2, Wb)))
        m.d.comb += n.eq(Mux(rem < cap, rem, cap))
        q = fifo.SyncFIFOBuffered(width=66 * P + 32, depth=8)
        m.submodules.resq = q
        inflight_last = Signal(range(8))

        # ---- per-port byte gearboxes: a ring of two beats per port; beats are written whole into the
        # half after the valid bytes, the window (W bits from the read pointer) is one rotation in
        # SEC_ALIGN-byte steps (sections are padded to SEC_ALIGN bytes, so every step consumes a
        # multiple of it). Invariant: read pointer + valid bytes = the next half to write (mod 2 beats).
        lga = _lg(SEC_ALIGN)
        rings = [[Signal(W, name=f"gb{p}_{h}") for h in range(2)] for p in range(P)]
        rps = [Signal(range(2 * Wb // SEC_ALIGN), name=f"gbr{p}") for p in range(P)]   # in SEC_ALIGN units
        whs = [Signal(name=f"gbw{p}") for p in range(P)]
        bufs = []
        for p in range(P):
            win = Signal(W, name=f"gb{p}")
            ring3 = Cat(rings[p][0], rings[p][1], rings[p][0][:W - 8 * SEC_ALIGN])
            m.d.comb += win.eq(ring3 >> Cat(Const(0, 3 + lga), rps[p]))
            bufs.append(win)
        cnts = [Signal(range(2 * Wb + 1), name=f"gbn{p}") for p in range(P)]
        ready_all = Cat(*[c >= n for c in cnts]).all()
        step = Signal()
        m.d.comb += step.eq(running & ready_all & (q.w_level + inflight_last < 4))
        for p in range(P):
            ws = self.w[p]
            acc_beat = Signal(name=f"acc_beat{p}")
            used = Mux(step, n, 0)
            # take a beat whenever it fits after this cycle's consumption (full rate at W/8 B per step)
            m.d.comb += [acc_beat.eq(running & ws.valid & (cnts[p] - used <= Wb)), ws.ready.eq(acc_beat)]
            m.d.sync += rps[p].eq(rps[p] + (used >> lga))    # wraps at 2 beats (a power of two)
            with m.If(acc_beat):
                m.d.sync += [whs[p].eq(~whs[p]), cnts[p].eq(cnts[p] - used + Wb)]
                with m.If(whs[p]):
                    m.d.sync += rings[p][1].eq(ws.payload)
                with m.Else():
                    m.d.sync += rings[p][0].eq(ws.payload)
            with m.Else():
                m.d.sync += cnts[p].eq(cnts[p] - used)
            with m.If(self.start):
                m.d.sync += [cnts[p].eq(0), rps[p].eq(0), whs[p].eq(0)]
        with m.If(self.w[0].valid & self.w[0].ready):
            m.d.sync += self.consumed.eq(self.consumed + 1)

        # section sequencing
        last_in_sec = rem == n
        nxt = Signal(3)
        m.d.comb += nxt.eq(Mux(sec == SEC_ZE, Mux(sparse, SEC_IX, SEC_CO), sec + 1))
        rec_end = (sec == SEC_CO) & last_in_sec
        with m.If(self.start):
            m.d.sync += [sec.eq(SEC_SH), rem.eq(SEC_ALIGN), srow.eq(0), rec.eq(0)]
        with m.Elif(step):
            with m.If(last_in_sec):
                m.d.sync += srow.eq(0)
                with m.If(rec_end):
                    m.d.sync += [sec.eq(SEC_SH), rem.eq(sec_bytes[SEC_SH]), rec.eq(rec + 1)]
                    with m.If(rec + 1 == rows):
                        m.d.sync += running.eq(0)
                with m.Else():
                    m.d.sync += [sec.eq(nxt), rem.eq(Array(sec_bytes)[nxt])]
            with m.Else():
                m.d.sync += [rem.eq(rem - n), srow.eq(srow + 1)]
            with m.If(sec == SEC_SH):
                m.d.sync += [sh[p].eq(bufs[p][:8]) for p in range(P)]
        # per-port section memories
        col0 = Signal(32)
        m.d.comb += col0.eq(srow << lg_c)
        ixoff = Signal(32)                     # idx bit offset of this code step: 3 bits per 4 columns
        m.d.comb += ixoff.eq((col0 >> 2) * 3)
        gi0 = Signal(32)
        m.d.comb += gi0.eq(col0 >> lg_g)
        rd = []
        for p in range(P):
            ports = {}
            for name, depth, code in (("sc", self.sc_rows, SEC_SC), ("ze", self.ze_rows, SEC_ZE),
                                      ("ix", self.ix_rows, SEC_IX)):
                # scales and zeros in block RAM (a 512-bit row of LUT RAM costs ~290 LUTs per read port;
                # the U280 has BRAM to spare), the 2:4 indices (two read ports) in LUT RAM
                mem = memory.Memory(shape=unsigned(W), depth=depth, init=[],
                                    attrs={"ram_style": "block"} if name != "ix" else None)
                m.submodules[f"{name}{p}"] = mem
                wp = mem.write_port()
                m.d.comb += [wp.addr.eq(srow), wp.data.eq(bufs[p][:W]), wp.en.eq(step & (sec == code))]
                ports[name] = mem.read_port()
                if name == "ix":
                    ports["ix1"] = mem.read_port()
            m.d.comb += [ports["sc"].addr.eq(Mux(scale8, gi0 >> (self.lgW - 3), gi0 >> (self.lgW - 4))),
                         ports["ze"].addr.eq((gi0 << lg_b) >> self.lgW),     # W/b zeros per row
                         ports["ix"].addr.eq(ixoff >> self.lgW), ports["ix1"].addr.eq((ixoff >> self.lgW) + 1)]
            rd.append(ports)

        # ---- stage 1: the code step's registers (memories answer in this cycle)
        code_step = step & (sec == SEC_CO)
        m.d.comb += xr.addr.eq(col0 >> (self.lgW - 1))
        v1, last1 = Signal(), Signal()
        sh1 = [Signal(signed(8), name=f"sh1_{p}") for p in range(P)]
        rec1, col1, ixo1 = Signal(32), Signal(32), Signal(range(W))
        heads1 = [Signal(W, name=f"head1_{p}") for p in range(P)]
        m.d.sync += [v1.eq(code_step), last1.eq(rec_end), Cat(*sh1).eq(Cat(*sh)), rec1.eq(rec), col1.eq(col0),
                     ixo1.eq(ixoff[:self.lgW])]
        for p in range(P):
            m.d.sync += heads1[p].eq(bufs[p][:W])
        kleft = Signal(32)
        m.d.comb += kleft.eq(K - col1)

        # x lanes: an x row holds L columns; a code step covers C = L >> bits_sel of them
        xsub = Signal(range(L))
        m.d.comb += xsub.eq(col1[:self.lgW - 1])
        xlane = []
        for i in range(L):
            xi = Signal(signed(8), name=f"x{i}")
            sl = lambda j: xr.data[8 * j: 8 * j + 8]   # noqa: E731
            with m.Switch(bits_sel):
                with m.Case(0):
                    m.d.comb += xi.eq(sl(i))
                if i < L // 2:
                    with m.Case(1):
                        m.d.comb += xi.eq(Mux(xsub[-1], sl(i + L // 2), sl(i)))
                if i < L // 4:
                    with m.Case(2):
                        qq = xsub[-2:]
                        m.d.comb += xi.eq(Mux(qq == 0, sl(i), Mux(qq == 1, sl(i + L // 4),
                                                                  Mux(qq == 2, sl(i + L // 2), sl(i + 3 * L // 4)))))
            xlane.append(xi)
        in_k = [Signal(name=f"ink{i}") for i in range(L)]
        for i in range(L):
            m.d.comb += in_k[i].eq(kleft > i)
        # S_j (sum of the kept x of a chunk) without a per-port tree: dense layers keep the same columns
        # on every port (those < K with a code at this width), so their S_j is computed once; a 2:4 port
        # keeps two columns of every 4-group, so it picks one of the group's six pair sums (computed
        # once) by its pattern index and adds four of them per chunk.
        act = [Signal(name=f"act{i}") for i in range(L)]       # lane i has a code at this width
        for i in range(L):
            m.d.comb += act[i].eq(Mux(bits_sel == 0, 1, Mux(bits_sel == 1, i < L // 2, i < L // 4)) & in_k[i])
        s_dense = []
        for j in range(NCH):
            sd = Signal(signed(13), name=f"Sd{j}")
            m.d.comb += sd.eq(sum(Mux(act[i], xlane[i], 0) for i in range(CHUNK * j, CHUNK * (j + 1))))
            s_dense.append(sd)
        pair_sums = []
        for u in range(L // 4):
            vals = [Signal(signed(9), name=f"ps{u}_{nn}") for nn in range(8)]     # patterns 6, 7: none kept
            m.d.comb += [vals[nn].eq(xlane[4 * u + a] + xlane[4 * u + b]) for nn, (a, b) in enumerate(PATTERNS)]
            pair_sums.append(Array(vals))
        # chunk -> entries of the scale / zero rows. The groups of one code step are one aligned block
        # of at most 16 (C / group, a power of two; a single group when group > C), so all of them lie
        # in the aligned 16-entry window of the first one, g0: each memory row is cut to that window once
        # per port (a narrow mux) and a chunk picks entry (g0 + j >> (lg_g - 4)) mod 16 from it (a 16:1
        # mux), instead of every chunk selecting from the whole W-bit row. Chunks past the step's C
        # columns (W4, W8) keep no lanes, so their entry does not matter.
        g0 = Signal(32)
        m.d.comb += g0.eq(col1 >> lg_g)
        ent = []
        for j in range(NCH):
            ej = Signal(4, name=f"e{j}")
            m.d.comb += ej.eq(g0[:4] + (Const(j, 4) >> (lg_g - 4)[:3]))
            ent.append(ej)

        v2, last2, rec2 = Signal(), Signal(), Signal(32)
        sh2 = [Signal(signed(8), name=f"sh2_{p}") for p in range(P)]
        m.d.sync += [v2.eq(v1), last2.eq(last1), Cat(*sh2).eq(Cat(*sh1)), rec2.eq(rec1)]
        Psum = [[Signal(signed(24), name=f"P{p}_{j}") for j in range(NCH)] for p in range(P)]
        Ssum = [[Signal(signed(13), name=f"S{p}_{j}") for j in range(NCH)] for p in range(P)]
        Z2 = [[Signal(8, name=f"Z{p}_{j}") for j in range(NCH)] for p in range(P)]
        M2 = [[Signal(16, name=f"M{p}_{j}") for j in range(NCH)] for p in range(P)]
        for p in range(P):
            head = heads1[p]
            ixbits = Signal(W, name=f"ixb{p}")
            # the idx bits of a code step start at a multiple of 3C/4, C >= W/8 columns: the low lgW - 5
            # bits of the offset are always 0, so the shifter moves by 2**(lgW-5) bits, not by any bit
            z = self.lgW - 5
            m.d.comb += ixbits.eq(Cat(rd[p]["ix"].data, rd[p]["ix1"].data) >> Cat(Const(0, z), ixo1[z:]))
            codes, keeps = [], []
            for i in range(L):
                width = 8 if i < L // 4 else (4 if i < L // 2 else 2)
                c = Signal(width, name=f"c{p}_{i}")
                kp = Signal(name=f"k{p}_{i}")
                u, pos = i // 4, i % 4
                idx = ixbits[3 * u: 3 * u + 3]
                first = [nn for nn, pat in enumerate(PATTERNS) if pat[0] == pos]
                second = [nn for nn, pat in enumerate(PATTERNS) if pat[1] == pos]
                is_first = Cat(*[idx == nn for nn in first]).any() if first else Const(0)
                is_second = Cat(*[idx == nn for nn in second]).any() if second else Const(0)
                with m.Switch(bits_sel):
                    for sel, b in ((0, 2), (1, 4), (2, 8)):
                        if i >= L >> sel:
                            continue
                        with m.Case(sel):
                            with m.If(sparse):
                                c0 = head[2 * u * b: 2 * u * b + b]
                                c1 = head[(2 * u + 1) * b: (2 * u + 1) * b + b]
                                m.d.comb += [c.eq(Mux(is_first, c0, c1)), kp.eq((is_first | is_second) & in_k[i])]
                            with m.Else():
                                m.d.comb += [c.eq(head[b * i: b * i + b]), kp.eq(in_k[i])]
                codes.append(c)
                keeps.append(kp)
            # this port's 16-entry windows of the scale and zero rows, widened to 16 / 8 bits per entry
            blk = g0[4:]
            sc_win = Signal(16 * 16, name=f"scw{p}")
            sc8 = _window(rd[p]["sc"].data, blk, self.lgW - 7, 16 * 8)
            sc16 = _window(rd[p]["sc"].data, blk, self.lgW - 8, 16 * 16)
            sc8w = Cat(*[Cat(sc8[8 * e: 8 * e + 8], Const(0, 8)) for e in range(16)])
            m.d.comb += sc_win.eq({8: sc8w, 16: sc16}[self.scale_bits] if self.scale_bits else Mux(scale8, sc8w, sc16))
            ze_win = Signal(16 * 8, name=f"zew{p}")
            zw = {sel: _window(rd[p]["ze"].data, blk, self.lgW - (sel + 1) - 4, 16 * b)
                  for sel, b in ((0, 2), (1, 4), (2, 8))}
            m.d.comb += ze_win.eq(Mux(bits_sel == 0, Cat(*[Cat(zw[0][2 * e: 2 * e + 2], Const(0, 6)) for e in range(16)]),
                                      Mux(bits_sel == 1, Cat(*[Cat(zw[1][4 * e: 4 * e + 4], Const(0, 4)) for e in range(16)]),
                                          zw[2])))
            for j in range(NCH):
                lanes = range(CHUNK * j, CHUNK * (j + 1))
                # a DSP lane's keep gates its code (the multiplier then yields 0), a LUT lane's its product
                prods = [lane_product(Mux(keeps[i], codes[i], 0), xlane[i]) if len(codes[i]) >= 4 else
                         Mux(keeps[i], lane_product(codes[i], xlane[i]), 0) for i in lanes]
                s24 = []
                for u in range(CHUNK * j // 4, CHUNK * (j + 1) // 4):
                    t = Signal(signed(9), name=f"s24_{p}_{u}")
                    m.d.comb += t.eq(Mux(act[4 * u], pair_sums[u][ixbits[3 * u: 3 * u + 3]], 0))
                    s24.append(t)
                m.d.sync += [Psum[p][j].eq(sum(prods)), Ssum[p][j].eq(Mux(sparse, sum(s24), s_dense[j]))]
                m.d.sync += [M2[p][j].eq(sc_win.word_select(ent[j], 16)), Z2[p][j].eq(ze_win.word_select(ent[j], 8))]

        # ---- stage 2 -> 3: t_j = P_j - zero*S_j
        v3, last3, rec3 = Signal(), Signal(), Signal(32)
        sh3 = [Signal(signed(8), name=f"sh3_{p}") for p in range(P)]
        m.d.sync += [v3.eq(v2), last3.eq(last2), Cat(*sh3).eq(Cat(*sh2)), rec3.eq(rec2)]
        T3 = [[Signal(signed(26), name=f"T{p}_{j}") for j in range(NCH)] for p in range(P)]
        M3 = [[Signal(16, name=f"M3_{p}_{j}") for j in range(NCH)] for p in range(P)]
        for p in range(P):
            for j in range(NCH):
                m.d.sync += [T3[p][j].eq(Psum[p][j] - Z2[p][j] * Ssum[p][j]), M3[p][j].eq(M2[p][j])]

        # ---- stage 3 -> 4: acc += sum_j t_j * M_j ; the end of a record hands over to the finisher
        acc = [Signal(signed(58), name=f"acc{p}") for p in range(P)]
        v4, rec4 = Signal(), Signal(32)
        sh4 = [Signal(signed(8), name=f"sh4_{p}") for p in range(P)]
        fin = [Signal(signed(58), name=f"fin{p}") for p in range(P)]
        m.d.sync += v4.eq(v3 & last3)
        with m.If(v3 & last3):
            m.d.sync += [Cat(*sh4).eq(Cat(*sh3)), rec4.eq(rec3)]
        for p in range(P):
            contrib = Signal(signed(46), name=f"contrib{p}")
            m.d.comb += contrib.eq(sum(T3[p][j] * M3[p][j] for j in range(NCH)))
            with m.If(v3):
                with m.If(last3):
                    m.d.sync += [fin[p].eq(acc[p] + contrib), acc[p].eq(0)]
                with m.Else():
                    m.d.sync += acc[p].eq(acc[p] + contrib)
            with m.If(self.start):
                m.d.sync += acc[p].eq(0)
        m.d.sync += inflight_last.eq(inflight_last + (code_step & rec_end) - v4)
        with m.If(self.start):
            m.d.sync += inflight_last.eq(0)

        # ---- stage 4: every port's sum and shift into the result FIFO; the FIFO drains one port per
        # cycle, so one shared finisher (sat48, * ma, shift_sat32) serves all ports
        m.d.comb += [q.w_en.eq(v4), q.w_data.eq(Cat(rec4, *[Cat(fin[p], sh4[p]) for p in range(P)]))]

        # ---- result FIFO -> finisher -> output memory, one word per cycle: port p's row rec is row p*R + rec
        wsel = Signal(range(P))
        m.d.comb += q.r_en.eq(0)
        ent_w = Signal(66)
        m.d.comb += ent_w.eq(q.r_data[32:].word_select(wsel, 66))
        r = Signal(signed(10))
        m.d.comb += r.eq(ent_w[58:].as_signed() - ea)
        a48 = sat_const(m, ent_w[:58].as_signed(), 48, "a48")
        y = Signal(signed(65))
        m.d.comb += y.eq(a48 * ma)
        res = shift_sat32(m, y, r, "res")
        word = Signal(32)
        m.d.comb += word.eq(q.r_data[:32] + wsel * rows)
        m.d.comb += [ow.addr.eq(word >> _lg(E)), ow.data.eq(Cat(*([res] * E))),
                     ow.en.eq(Mux(q.r_rdy, 1 << word[:_lg(E)], 0))]
        with m.If(q.r_rdy):
            with m.If(wsel == P - 1):
                m.d.sync += wsel.eq(0)
                m.d.comb += q.r_en.eq(1)
            with m.Else():
                m.d.sync += wsel.eq(wsel + 1)

        m.d.comb += self.busy.eq(running | v1 | v2 | v3 | v4 | q.r_rdy | (q.w_level != 0) | (inflight_last != 0))
        return m
