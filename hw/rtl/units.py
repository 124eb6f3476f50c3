"""Execution units of the kernel for the row operations: EMBED, RMSNORM, QUANT, SILUMUL,
ADD and ARGMAX, each a :class:`hw.rtl.unit.Unit` (the kernel's :func:`hw.rtl.unit.unit_signature`),
wrapping the bit-exact cores of hw/rtl/sfu.py. The functional model (sim/emu.py ``_exec``) is the
reference for what each opcode reads, computes and writes (byte for byte, also the bytes it leaves
alone: an X8 row gets its scale word in bytes 0..3 and its codes at +64, nothing else).

Row units (RMSNORM, QUANT, SILUMUL, ADD) work token by token:
  LOAD   the X32 source row (io + b + t * stride32(width)) into buffer A through the ctrl read DMA;
         ADD also loads the destination row into buffer B; RMSNORM loads its descriptor
         (header + gamma, weights0 + d) once into buffer B through weight port 0;
  RUN    streams the elements (one per cycle) into the SFU core(s), results into the output buffer
         (byte-enable writes, so the X8 header bytes that emu does not write keep their old value
         only if the write strobes skip them: they do — strobes cover exactly the written bytes);
  WRITE  the output row through the write DMA (strobes = the bytes written), waits for the B responses.
EMBED copies table rows (weights<p>, the port holding the row) to io beat by beat; ARGMAX streams the
last token's logits row into the argmax core and writes one int32.

Status codes (as sim/emu.py): width 0 or > max_hidden -> STATUS_SHAPE; n_tokens outside
1..max_prefill -> STATUS_SHAPE; an operand past the 4 GiB offset space of its buffer ->
STATUS_ADDR_RANGE; a descriptor with a wrong magic -> STATUS_ADDR_RANGE; RMSNORM/EMBED width
different from the descriptor's -> STATUS_SHAPE; a token id outside the table -> STATUS_ADDR_RANGE.
RTL limits (STATUS_SHAPE, documented in docs/rtl.md): EMBED needs 4*D to be a multiple of the port
width in bytes, ARGMAX a destination offset aligned to 4 bytes.
"""
from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import memory

from hw import isa, memmap, regmap

from .sfu import ActQuant, Argmax, EltWise, RMSNorm
from .unit import Unit, _end64


def _s32(d):
    """stride32(d) (bytes) as an expression."""
    return ((d << 2) + 63) & ~63


def _s8(d):
    return 64 + ((d + 63) & ~63)


# --------------------------------------------------------------------------------------------------
# RMSNORM / QUANT / SILUMUL / ADD
# --------------------------------------------------------------------------------------------------
class _RowUnit(Unit):
    KIND = ""

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        a, b, c, d = self.fields("a", "b", "c", "d")
        W, Wb, lgWb, WPB, lgWPB = self.W, self.Wb, self.lgWb, self.WPB, self.lgWPB
        kind = self.KIND
        H = cfg.max_hidden
        in_words = 2 * H if kind == "silumul" else H
        depth_a = max(2, -(-in_words * 4 // Wb))
        depth_b = max(2, -(-(H * 4 + 64) // Wb))
        depth_o = max(2, -(-(H * 4 + 64) // Wb))
        m.submodules.buf_a = buf_a = memory.Memory(shape=W, depth=depth_a, init=[])
        m.submodules.buf_o = buf_o = memory.Memory(shape=W, depth=depth_o, init=[])
        # the buffers are read synchronously (block RAM: an asynchronous read puts them in LUTs), at
        # the address the element counters will have in the next cycle (ia_n, ib_n, cnt_n below)
        wa = buf_a.write_port()
        ra1 = buf_a.read_port()
        ra2 = buf_a.read_port()
        wo = buf_o.write_port(granularity=8)
        ro = buf_o.read_port()
        has_b = kind in ("rmsnorm", "add")
        if has_b:
            m.submodules.buf_b = buf_b = memory.Memory(shape=W, depth=depth_b, init=[])
            wbp = buf_b.write_port()
            rb = buf_b.read_port()

        x8_out = kind != "add"
        D = Signal(16)
        m.d.comb += D.eq(c)
        width = (D << 1) if kind == "silumul" else D
        src_stride = Signal(32)
        dst_stride = Signal(32)
        m.d.comb += [src_stride.eq(_s32(width)), dst_stride.eq(_s8(D) if x8_out else _s32(D))]
        out_bytes = Signal(32)           # bytes of the output row up to the last written one
        m.d.comb += out_bytes.eq((64 + D) if x8_out else (D << 2))
        out_beats = Signal(32)
        m.d.comb += out_beats.eq(self._beats(out_bytes))

        # cores
        aq = None
        if x8_out:
            m.submodules.aq = aq = ActQuant(H)
            m.d.comb += aq.n.eq(D)
        if kind == "rmsnorm":
            m.submodules.rn = core = RMSNorm(H)
            m.d.comb += core.n.eq(D)
        elif kind in ("silumul", "add"):
            m.submodules.ew = core = EltWise()
            m.d.comb += core.op.eq(kind == "silumul")
        else:
            core = None

        T = self.n_tokens
        t = Signal(32)
        src_off, dst_off = Signal(33), Signal(33)
        cnt = Signal(32)                 # beats received / sent
        ia, ib = Signal(32), Signal(32)  # elements fed on the two input streams
        ia_n, ib_n = Signal(32), Signal(32)   # their values in the next cycle (the buffers' read addresses)
        m.d.comb += [ia_n.eq(ia), ib_n.eq(ib)]
        m.d.sync += [ia.eq(ia_n), ib.eq(ib_n)]
        no = Signal(32)                  # results collected
        issued = Signal()
        e40 = Signal(64)
        started = Signal()

        def elem(rp, idx, idx_n, base_words=0):
            i = idx + base_words
            m.d.comb += rp.addr.eq((idx_n + base_words) >> lgWPB)
            return rp.data.word_select(i[:lgWPB], 32).as_signed() if lgWPB else rp.data.as_signed()

        # input streams of the first core
        first_i = core.i if core is not None and kind == "rmsnorm" else (core.a if core is not None else aq.i)
        xa = elem(ra1, ia, ia_n)
        if kind == "silumul":
            xb = elem(ra2, ib, ib_n, D)
        elif has_b:
            xb = elem(rb, ib, ib_n, 16 if kind == "rmsnorm" else 0)
        second = None
        if kind == "rmsnorm":
            second = core.g
        elif kind in ("silumul", "add"):
            second = core.b
        # result stream
        res = aq.o if x8_out else core.o
        if kind in ("rmsnorm", "silumul"):
            m.d.comb += [aq.i.valid.eq(core.o.valid), aq.i.payload.eq(core.o.payload), core.o.ready.eq(aq.i.ready)]

        bad_shape = Signal()
        m.d.comb += bad_shape.eq((D == 0) | (D > H) | (T == 0) | (T > cfg.max_prefill))
        bad_addr = Signal()
        m.d.comb += bad_addr.eq(_end64(b, T * src_stride) | _end64(a, T * dst_stride))
        nrm_magic = Signal(32)
        nrm_d = Signal(32)

        with self.fsm(m, "CHECK"):
            with m.State("CHECK"):
                with self.checks(m, (bad_shape, regmap.STATUS_SHAPE), (bad_addr, regmap.STATUS_ADDR_RANGE)):
                    m.d.sync += [t.eq(0), src_off.eq(b), dst_off.eq(a), cnt.eq(0)]
                    m.next = "DESC" if kind == "rmsnorm" else "LOAD_A"
            if kind == "rmsnorm":
                with m.State("DESC"):
                    m.d.comb += [self.w_cmd[0].valid.eq(1), self.w_cmd[0].payload.addr.eq(self.weights[0] + d),
                                 self.w_cmd[0].payload.beats.eq(self._beats(64 + (D << 2)))]
                    with m.If(self.w_cmd[0].ready):
                        m.next = "DESC_RX"
                with m.State("DESC_RX"):
                    m.d.comb += [self.w_data[0].ready.eq(1), wbp.addr.eq(cnt), wbp.data.eq(self.w_data[0].payload),
                                 wbp.en.eq(self.w_data[0].valid)]
                    with m.If(self.w_data[0].valid):
                        m.d.sync += cnt.eq(cnt + 1)
                        with m.If(cnt == 0):
                            m.d.sync += [nrm_magic.eq(self.w_data[0].payload[0:32]), nrm_d.eq(self.w_data[0].payload[32:64]),
                                         e40.eq(self.w_data[0].payload[64:128])]
                        with m.If(cnt + 1 == self._beats(64 + (D << 2))):
                            m.next = "DESC_CHECK"
                with m.State("DESC_CHECK"):
                    with self.checks(m, (nrm_magic != memmap.MAGIC_NRM, regmap.STATUS_ADDR_RANGE),
                                     (nrm_d != D, regmap.STATUS_SHAPE)):
                        m.d.sync += cnt.eq(0)
                        m.next = "LOAD_A"
                m.d.comb += core.e40.eq(e40)
            with m.State("LOAD_A"):
                m.d.comb += [self.rd_cmd.valid.eq(1), self.rd_cmd.payload.addr.eq(self.io + src_off),
                             self.rd_cmd.payload.beats.eq(self._beats(width << 2))]
                with m.If(self.rd_cmd.ready):
                    m.d.sync += cnt.eq(0)
                    m.next = "RX_A"
            with m.State("RX_A"):
                m.d.comb += [self.rd_data.ready.eq(1), wa.addr.eq(cnt), wa.data.eq(self.rd_data.payload),
                             wa.en.eq(self.rd_data.valid)]
                with m.If(self.rd_data.valid):
                    m.d.sync += cnt.eq(cnt + 1)
                    with m.If(cnt + 1 == self._beats(width << 2)):
                        m.d.sync += cnt.eq(0)
                        m.next = "LOAD_B" if kind == "add" else "RUN0"
            if kind == "add":
                with m.State("LOAD_B"):
                    m.d.comb += [self.rd_cmd.valid.eq(1), self.rd_cmd.payload.addr.eq(self.io + dst_off),
                                 self.rd_cmd.payload.beats.eq(self._beats(D << 2))]
                    with m.If(self.rd_cmd.ready):
                        m.next = "RX_B"
                with m.State("RX_B"):
                    m.d.comb += [self.rd_data.ready.eq(1), wbp.addr.eq(cnt), wbp.data.eq(self.rd_data.payload),
                                 wbp.en.eq(self.rd_data.valid)]
                    with m.If(self.rd_data.valid):
                        m.d.sync += cnt.eq(cnt + 1)
                        with m.If(cnt + 1 == self._beats(D << 2)):
                            m.next = "RUN0"
            with m.State("RUN0"):
                if kind == "rmsnorm":
                    m.d.comb += [core.start.eq(1), aq.start.eq(1)]
                elif x8_out:
                    m.d.comb += aq.start.eq(1)
                m.d.sync += no.eq(0)
                m.d.comb += [ia_n.eq(0), ib_n.eq(0)]
                m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += [first_i.valid.eq(ia < D), first_i.payload.eq(xa)]
                with m.If(first_i.valid & first_i.ready):
                    m.d.comb += ia_n.eq(ia + 1)
                if second is not None:
                    m.d.comb += [second.valid.eq(ib < D), second.payload.eq(xb)]
                    with m.If(second.valid & second.ready):
                        m.d.comb += ib_n.eq(ib + 1)
                # results -> output buffer (byte enables)
                m.d.comb += res.ready.eq(1)
                if x8_out:
                    byte = Signal(32)
                    m.d.comb += byte.eq(Mux(no < D, 64 + no, 0))
                    lane = byte[:lgWb]
                    with m.If(no < D):
                        m.d.comb += [wo.data.eq(res.payload[:8].replicate(Wb)), wo.en.eq(Mux(res.valid, Const(1, Wb) << lane, 0))]
                    with m.Else():
                        m.d.comb += [wo.data.eq(res.payload.replicate(WPB)), wo.en.eq(Mux(res.valid, 0xF, 0))]
                    m.d.comb += wo.addr.eq(byte >> lgWb)
                    last = D
                else:
                    lanew = no[:lgWPB]
                    m.d.comb += [wo.addr.eq(no >> lgWPB), wo.data.eq(res.payload.replicate(WPB)),
                                 wo.en.eq(Mux(res.valid, Const(0xF, 4) << (lanew << 2), 0))]
                    last = D - 1
                with m.If(res.valid):
                    m.d.sync += no.eq(no + 1)
                    with m.If(no == last):
                        m.d.sync += [cnt.eq(0), issued.eq(0)]
                        m.next = "WRITE"
            with m.State("WRITE"):
                m.d.comb += [self.wr_cmd.valid.eq(~issued), self.wr_cmd.payload.addr.eq(self.io + dst_off),
                             self.wr_cmd.payload.beats.eq(out_beats)]
                with m.If(self.wr_cmd.valid & self.wr_cmd.ready):
                    m.d.sync += issued.eq(1)
                # strobes: the bytes the op writes in beat cnt
                lo = Signal(32)
                m.d.comb += lo.eq(cnt << lgWb)
                strb = Signal(Wb)
                bits = []
                for j in range(Wb):
                    pos = lo + j
                    if x8_out:
                        bits.append((pos < 4) | ((pos >= 64) & (pos < 64 + D)))
                    else:
                        bits.append(pos < (D << 2))
                m.d.comb += strb.eq(Cat(*bits))
                # ro.data is beat cnt: read at the next cnt (no data goes out in the first WRITE cycle,
                # issued is 0 there, so the read of beat 0 issued in that cycle is in time)
                m.d.comb += [ro.addr.eq(Mux(self.wr_data.valid & self.wr_data.ready, cnt + 1, cnt)),
                             self.wr_data.valid.eq(issued & (cnt < out_beats)),
                             self.wr_data.payload.data.eq(ro.data), self.wr_data.payload.strb.eq(strb)]
                with m.If(self.wr_data.valid & self.wr_data.ready):
                    m.d.sync += cnt.eq(cnt + 1)
                with m.If(issued & (cnt == out_beats) & ~self.wr_busy & ~started):
                    m.d.sync += started.eq(1)
                with m.If(started):
                    m.d.sync += started.eq(0)
                    with m.If(~self.wr_busy):
                        with m.If(t + 1 >= T):
                            m.next = "DONE"
                        with m.Else():
                            m.d.sync += [t.eq(t + 1), src_off.eq(src_off + src_stride),
                                         dst_off.eq(dst_off + dst_stride), cnt.eq(0)]
                            m.next = "LOAD_A"
        return m


class RMSNormUnit(_RowUnit):
    """RMSNORM: a=dst X8, b=src X32, d=norm descriptor (port 0), c=D."""
    KIND = "rmsnorm"


class QuantUnit(_RowUnit):
    """QUANT: a=dst X8, b=src X32, c=D."""
    KIND = "quant"


class SiluMulUnit(_RowUnit):
    """SILUMUL: a=dst X8, b=src X32 [gate | up] (2*I wide), c=I."""
    KIND = "silumul"


class AddUnit(_RowUnit):
    """ADD: dst X32 (a) += src X32 (b), saturating; c=D."""
    KIND = "add"


# --------------------------------------------------------------------------------------------------
# EMBED
# --------------------------------------------------------------------------------------------------
class EmbedUnit(Unit):
    """EMBED: a=dst X32, b=token ids (int32), d=table descriptor (lockstep on every weight port), c=D.
    Row id lives on port id // R at weights<p> + d + 64 + (id % R) * 4D (hw/memmap.pack_embedding)."""

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        a, b, c, d = self.fields("a", "b", "c", "d")
        W, Wb, lgWb, WPB, lgWPB = self.W, self.Wb, self.lgWb, self.WPB, self.lgWPB
        P = cfg.weight_ports
        T = self.n_tokens
        D = Signal(16)
        m.d.comb += D.eq(c)
        hdr = Signal(W)
        magic, V, Dt, R = hdr[0:32], hdr[32:64], hdr[64:96], hdr[96:128]
        t = Signal(32)
        tid = Signal(32)
        port = Signal(range(P + 1))
        local = Signal(32)
        cnt = Signal(32)
        issued = Signal()
        started = Signal()
        row_bytes = Signal(32)
        m.d.comb += row_bytes.eq(D << 2)
        row_beats = Signal(32)
        m.d.comb += row_beats.eq(row_bytes >> lgWb)
        bad_shape = Signal()
        m.d.comb += bad_shape.eq((D == 0) | (T == 0) | (T > cfg.max_prefill) | (row_bytes[:lgWb] != 0))
        bad_addr = Signal()
        m.d.comb += bad_addr.eq(_end64(b, T << 2) | _end64(a, T * _s32(D)) | ((b & 3) != 0))
        bad_id = Signal()
        ids_lo = Signal(64)
        m.d.comb += ids_lo.eq((self.io + b) & ~(Wb - 1))
        ids_beats = Signal(32)
        m.d.comb += ids_beats.eq((((self.io + b + (T << 2)) - ids_lo) + Wb - 1) >> lgWb)
        tok_addr = Signal(64)
        m.d.comb += tok_addr.eq(self.io + b + (t << 2))
        # port of the row: the largest p with id >= p * R
        p_calc = Signal(range(P + 1))
        for p in range(1, P):
            with m.If(tid >= R * p):
                m.d.comb += p_calc.eq(p)
        with self.fsm(m, "CHECK"):
            with m.State("CHECK"):
                with self.checks(m, (bad_shape, regmap.STATUS_SHAPE), (bad_addr, regmap.STATUS_ADDR_RANGE)):
                    m.next = "DESC"
            with m.State("DESC"):
                m.d.comb += [self.w_cmd[0].valid.eq(1), self.w_cmd[0].payload.addr.eq(self.weights[0] + d),
                             self.w_cmd[0].payload.beats.eq(1)]
                with m.If(self.w_cmd[0].ready):
                    m.next = "DESC_RX"
            with m.State("DESC_RX"):
                m.d.comb += self.w_data[0].ready.eq(1)
                with m.If(self.w_data[0].valid):
                    m.d.sync += hdr.eq(self.w_data[0].payload)
                    m.next = "DESC_CHECK"
            with m.State("DESC_CHECK"):
                with self.checks(m, (magic != memmap.MAGIC_EMB, regmap.STATUS_ADDR_RANGE), (Dt != D, regmap.STATUS_SHAPE)):
                    m.d.sync += [t.eq(0), cnt.eq(0), bad_id.eq(0)]
                    m.next = "IDS"
            # all ids are checked before any row is written (as sim/emu.py: a bad id writes nothing)
            with m.State("IDS"):
                m.d.comb += [self.rd_cmd.valid.eq(1), self.rd_cmd.payload.addr.eq(ids_lo),
                             self.rd_cmd.payload.beats.eq(ids_beats)]
                with m.If(self.rd_cmd.ready):
                    m.next = "IDS_RX"
            with m.State("IDS_RX"):
                m.d.comb += self.rd_data.ready.eq(1)
                with m.If(self.rd_data.valid):
                    m.d.sync += cnt.eq(cnt + 1)
                    for j in range(WPB):
                        wa_ = ids_lo + (cnt << lgWb) + 4 * j
                        inside = (wa_ >= self.io + b) & (wa_ < self.io + b + (T << 2))
                        with m.If(inside & (self.rd_data.payload[32 * j:32 * j + 32] >= V)):
                            m.d.sync += bad_id.eq(1)
                    with m.If(cnt + 1 == ids_beats):
                        m.next = "IDS_CHECK"
            with m.State("IDS_CHECK"):
                with self.checks(m, (bad_id, regmap.STATUS_ADDR_RANGE)):
                    m.next = "TOK"
            with m.State("TOK"):
                m.d.comb += [self.rd_cmd.valid.eq(1), self.rd_cmd.payload.addr.eq(tok_addr & ~(Wb - 1)),
                             self.rd_cmd.payload.beats.eq(1)]
                with m.If(self.rd_cmd.ready):
                    m.next = "TOK_RX"
            with m.State("TOK_RX"):
                m.d.comb += self.rd_data.ready.eq(1)
                with m.If(self.rd_data.valid):
                    m.d.sync += tid.eq(self.rd_data.payload.word_select(tok_addr[2:lgWb], 32))
                    m.next = "TOK_CHECK"
            with m.State("TOK_CHECK"):
                with self.checks(m, (tid >= V, regmap.STATUS_ADDR_RANGE)):     # unsigned: a negative id is >= V too
                    m.d.sync += [port.eq(p_calc), local.eq(tid - R * p_calc), issued.eq(0), cnt.eq(0)]
                    m.next = "ROW"
            with m.State("ROW"):
                # read the row on its port and write it to io + a + t * stride32(D), beat for beat
                for p in range(P):
                    wc, wd = self.w_cmd[p], self.w_data[p]
                    m.d.comb += [wc.payload.addr.eq(self.weights[p] + d + 64 + local * row_bytes),
                                 wc.payload.beats.eq(row_beats)]
                    with m.If(port == p):
                        m.d.comb += [wc.valid.eq(~issued),
                                     self.wr_cmd.valid.eq(~issued & wc.ready),
                                     self.wr_data.valid.eq(issued & wd.valid), wd.ready.eq(issued & self.wr_data.ready),
                                     self.wr_data.payload.data.eq(wd.payload)]
                        with m.If(wc.valid & wc.ready & self.wr_cmd.ready):
                            m.d.sync += issued.eq(1)
                m.d.comb += [self.wr_cmd.payload.addr.eq(self.io + a + t * _s32(D)),
                             self.wr_cmd.payload.beats.eq(row_beats),
                             self.wr_data.payload.strb.eq((1 << Wb) - 1)]
                with m.If(self.wr_data.valid & self.wr_data.ready):
                    m.d.sync += cnt.eq(cnt + 1)
                with m.If(issued & (cnt == row_beats)):
                    m.d.sync += started.eq(0)
                    m.next = "ROW_WAIT"
            with m.State("ROW_WAIT"):
                # wr_busy rises the cycle after the command; look at it one cycle later
                m.d.sync += started.eq(1)
                with m.If(started & ~self.wr_busy):
                    with m.If(t + 1 >= T):
                        m.next = "DONE"
                    with m.Else():
                        m.d.sync += t.eq(t + 1)
                        m.next = "TOK"
        return m


# --------------------------------------------------------------------------------------------------
# ARGMAX
# --------------------------------------------------------------------------------------------------
class ArgmaxUnit(Unit):
    """ARGMAX: a=dst (one int32), b=src X32 logits, d=V. Runs only with register flags bit 1; reads
    the last token's row."""

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        a, b, d = self.fields("a", "b", "d")
        W, Wb, lgWb, WPB, lgWPB = self.W, self.Wb, self.lgWb, self.WPB, self.lgWPB
        T = self.n_tokens
        m.submodules.am = am = Argmax(1 << 20)
        V = d
        m.d.comb += am.n.eq(V)
        cur = Signal(W)
        have = Signal()
        k = Signal(range(WPB + 1))
        fed = Signal(32)
        res = Signal(32)
        issued = Signal()
        started = Signal()
        row = Signal(33)
        m.d.comb += row.eq(b + (T - 1) * _s32(V))
        nbeats = Signal(32)
        m.d.comb += nbeats.eq(self._beats(V << 2))
        bad_shape = Signal()
        m.d.comb += bad_shape.eq((V == 0) | (V > (1 << 20)) | (T == 0) | (T > cfg.max_prefill) | ((a & 3) != 0))
        bad_addr = Signal()
        m.d.comb += bad_addr.eq(_end64(b, T * _s32(V)) | _end64(a, 4))
        with self.fsm(m, "CHECK"):
            with m.State("CHECK"):
                with self.checks(m, ((self.flags & isa.RF_ARGMAX) == 0, regmap.STATUS_OK),
                                 (bad_shape, regmap.STATUS_SHAPE), (bad_addr, regmap.STATUS_ADDR_RANGE)):
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [self.rd_cmd.valid.eq(1), self.rd_cmd.payload.addr.eq(self.io + row),
                             self.rd_cmd.payload.beats.eq(nbeats), am.start.eq(self.rd_cmd.ready)]
                with m.If(self.rd_cmd.ready):
                    m.d.sync += [have.eq(0), fed.eq(0), k.eq(0)]
                    m.next = "SCAN"
            with m.State("SCAN"):
                m.d.comb += self.rd_data.ready.eq(~have)
                with m.If(self.rd_data.valid & ~have):
                    m.d.sync += [cur.eq(self.rd_data.payload), have.eq(1), k.eq(0)]
                m.d.comb += [am.i.valid.eq(have & (fed < V)), am.i.payload.eq(cur.word_select(k[:lgWPB], 32))]
                with m.If(am.i.valid & am.i.ready):
                    m.d.sync += [fed.eq(fed + 1), k.eq(k + 1)]
                    with m.If((k == WPB - 1) | (fed + 1 == V)):
                        m.d.sync += have.eq(0)
                m.d.comb += am.o.ready.eq(1)
                with m.If(am.o.valid):
                    m.d.sync += [res.eq(am.o.payload), issued.eq(0)]
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                # the row's padding words after V in its last beat were already consumed: nothing left
                m.d.comb += [self.wr_cmd.valid.eq(~issued), self.wr_cmd.payload.addr.eq((self.io + a) & ~(Wb - 1)),
                             self.wr_cmd.payload.beats.eq(1)]
                with m.If(self.wr_cmd.valid & self.wr_cmd.ready):
                    m.d.sync += issued.eq(1)
                lane = (a[2:lgWb])
                m.d.comb += [self.wr_data.valid.eq(issued), self.wr_data.payload.data.eq(res.replicate(WPB)),
                             self.wr_data.payload.strb.eq(Const(0xF, Wb) << (lane << 2))]
                with m.If(self.wr_data.valid & self.wr_data.ready):
                    m.d.sync += started.eq(0)
                    m.next = "WAIT"
            with m.State("WAIT"):
                m.d.sync += started.eq(1)
                with m.If(started & ~self.wr_busy):
                    m.next = "DONE"
        return m


UNITS: dict[int, type] = {isa.EMBED: EmbedUnit, isa.RMSNORM: RMSNormUnit, isa.QUANT: QuantUnit,
                          isa.SILUMUL: SiluMulUnit, isa.ADD: AddUnit, isa.ARGMAX: ArgmaxUnit}
