"""The Vitis RTL kernel ``accllm_kernel``: control slave, DMAs, instruction fetch/decode, dispatch.

Ports (names as Vitis infers them): ``ap_clk``, ``ap_rst_n`` (active low, synchronous),
``s_axi_control_*`` (AXI4-Lite, hw/regmap.py), ``interrupt``, ``m_axi_ctrl_*`` (program, kv, io) and
``m_axi_w<p>_*`` (weights<p>), all AXI4 with 64-bit addresses and the config's data width.

Sequencer: on ap_start, pc = entry; FETCH reads the beat holding word pc (a beat of W/128 words is
kept, so consecutive words cost one read), DECODE checks the word exactly as hw/isa.decode does
(unknown opcode, undefined flag bits, non-zero unused fields -> STATUS_BAD_OPCODE), END finishes
with STATUS_OK, NOP skips, every other opcode is dispatched to the execution unit registered for it
(``UNITS``); an opcode without a unit in this build also stops with STATUS_BAD_OPCODE. A unit
returns a status; non-zero stops the run. pc reaching ``program_len`` without END stops with
STATUS_NO_END. Status = code | pc << 8; ap_done is raised in every case (never a hang).

The run starts at instruction ``entry`` (register; decode and prefill-bucket programs share one
program buffer, hw/memmap.py) and ``program_len`` counts from index 0.

Units implement :func:`unit_signature`: a start pulse with the instruction word and the argument
registers, a done pulse with a status code, and exclusive use of the ctrl-port read/write DMAs and
of every weight port's read and write DMAs while running (the KV cache lives in the weight buffers).
"""
from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from algo.common import AccllmError
from hw import isa, memmap, regmap
from hw.config import HWConfig

from .axi import ControlSlave, ReadDMA, WriteDMA, axi4_signature, axil_signature, connect_channels
from .engine import OUT_WORDS, MatrixEngine, sat_const
from .attn_unit import AttnUnit
from .tops import vitis_domain, vitis_members
from .topk_unit import TopkUnit
from .unit import Unit, _end64, _fields
from .units import UNITS as ROW_UNITS


class MatmulUnit(Unit):
    """MATMUL: X8 rows at io+b times the linear layer at weights+d, X32 rows to io+a (F_ACC: added,
    saturating). F_LOGITS: only if register flags & 3; every token's row with flags bit 0, else the last token's only.
    Tokens are processed one after the other (the weights stream once per token).

    Status: STATUS_SHAPE for a descriptor this engine cannot run (bad magic, bits not 2/4/8, scale
    mantissas not of the configuration's scale_bits (the compiler packs that width), group not a power of two in [16, 128], K > max_hidden, N > OUT_WORDS,
    port count or record size inconsistent, n_tokens > max_prefill); STATUS_ADDR_RANGE when an
    operand or the weight stream runs past the 4 GiB offset space of its buffer argument."""

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        P, W, Wb, lgWb = cfg.weight_ports, self.W, self.Wb, self.lgWb
        m.submodules.eng = eng = MatrixEngine(P, W, cfg.max_hidden, scale_bits=cfg.scale_bits)
        a, b, d, fl = self.fields("a", "b", "d", "flags")
        desc = Signal(512)
        dbeat = Signal(range(64 // Wb + 1))
        t, t_end = Signal(32), Signal(32)
        src_off, dst_off = Signal(33), Signal(33)

        # descriptor fields (memmap.LIN_HEADER)
        dw = [desc[32 * i: 32 * i + 32] for i in range(16)]
        magic, N, K, R = dw[0], dw[1], dw[2], dw[3]
        bits, sparse, group = dw[4][0:8], dw[4][8:16], dw[4][16:32]
        scale_bits, rec, port, ports, data_off, size = dw[5], dw[6], dw[7], dw[8], dw[9], dw[10]
        G = Signal(32)
        lg_g = Signal(5)
        m.d.comb += lg_g.eq(Mux(group == 16, 4, Mux(group == 32, 5, Mux(group == 64, 6, 7))))
        m.d.comb += G.eq(K >> lg_g)
        lg_b = Signal(4)
        m.d.comb += lg_b.eq(Mux(bits == 2, 1, Mux(bits == 4, 2, 3)))
        rec_calc = Signal(32)
        lga = memmap.SEC_ALIGN.bit_length() - 1

        def pad(nbytes):                    # record sections are padded to SEC_ALIGN bytes (hw/memmap.RowRecord)
            return ((nbytes + memmap.SEC_ALIGN - 1) >> lga) << lga

        m.d.comb += rec_calc.eq(memmap.SEC_ALIGN + pad(Mux(scale_bits == 8, G, 2 * G)) + pad(((G << lg_b) + 7) >> 3)
                                + Mux(sparse[0], pad((3 * (K >> 2) + 7) >> 3), 0)
                                + pad((((K >> sparse[0]) << lg_b) + 7) >> 3))
        stride8 = Signal(32)
        stride32 = Signal(32)
        m.d.comb += [stride8.eq(64 + ((K + 63) & ~63)), stride32.eq(((N << 2) + 63) & ~63)]
        stream_bytes = Signal(64)
        m.d.comb += stream_bytes.eq(R * rec)
        w_beats = Signal(32)
        m.d.comb += w_beats.eq((stream_bytes + Wb - 1) >> lgWb)
        bad_shape = Signal()
        m.d.comb += bad_shape.eq((magic != memmap.MAGIC_LIN) | ~((bits == 2) | (bits == 4) | (bits == 8))
                                 | (sparse > 1) | (scale_bits != cfg.scale_bits)
                                 | ~((group == 16) | (group == 32) | (group == 64) | (group == 128))
                                 | (K == 0) | (K > cfg.max_hidden) | ((K & (group - 1)) != 0)
                                 | (N == 0) | (N > OUT_WORDS) | (R * P < N) | (ports != P) | (port != 0)
                                 | (data_off != 64) | (rec != rec_calc)
                                 | (self.n_tokens > cfg.max_prefill))
        tokens = Signal(32)
        m.d.comb += tokens.eq(self.n_tokens)
        bad_addr = Signal()
        m.d.comb += bad_addr.eq(_end64(b, tokens * stride8) | _end64(a, tokens * stride32)
                                | _end64(d, 64 + stream_bytes))

        # write-back stream state
        nb = Signal(32)                     # output beats per token
        m.d.comb += nb.eq(((N << 2) + Wb - 1) >> lgWb)
        qi, qo = Signal(32), Signal(32)
        dv = Signal()
        acc_mode = Signal()
        xb = Signal(32)
        issued = Signal(P + 1)

        for p in range(P):          # the weight streams go straight into the engine
            wiring.connect(m, wiring.flipped(self.w_data[p]), eng.w[p])
        m.d.comb += [eng.bits_sel.eq(lg_b - 1), eng.sparse.eq(sparse[0]), eng.scale8.eq(scale_bits == 8), eng.lg_group.eq(lg_g), eng.k.eq(K),
                     eng.rows.eq(R)]

        started = Signal()

        def issue_weights():
            # the weight streams start while the activations load (their latency overlaps)
            for p in range(P):
                cmd = self.w_cmd[p]
                m.d.comb += [cmd.valid.eq(~issued[p]), cmd.payload.addr.eq(self.weights[p] + d + 64),
                             cmd.payload.beats.eq(w_beats)]
                with m.If(cmd.valid & cmd.ready):
                    m.d.sync += issued[p].eq(1)

        with self.fsm(m, "BEGIN", on_start=[dbeat.eq(0)]):
            with m.State("BEGIN"):
                logits = fl[1]
                with m.If((logits & ((self.flags & 3) == 0)) | (self.n_tokens == 0)):
                    m.next = "DONE"
                with m.Else():
                    m.d.sync += [t.eq(Mux(logits & ~self.flags[0], self.n_tokens - 1, 0)), t_end.eq(self.n_tokens)]
                    m.next = "DESC"
            with m.State("DESC"):
                m.d.comb += [self.w_cmd[0].valid.eq(1), self.w_cmd[0].payload.addr.eq(self.weights[0] + d),
                             self.w_cmd[0].payload.beats.eq(64 // Wb)]
                with m.If(self.w_cmd[0].ready):
                    m.next = "DESC_RX"
            with m.State("DESC_RX"):
                m.d.comb += self.w_data[0].ready.eq(1)
                with m.If(self.w_data[0].valid):
                    m.d.sync += [desc.word_select(dbeat, W).eq(self.w_data[0].payload), dbeat.eq(dbeat + 1)]
                    with m.If(dbeat == 64 // Wb - 1):
                        m.next = "CHECK"
            with m.State("CHECK"):
                with self.checks(m, (bad_shape, regmap.STATUS_SHAPE), (bad_addr, regmap.STATUS_ADDR_RANGE)):
                    m.d.sync += [src_off.eq(b + t * stride8), dst_off.eq(a + t * stride32), issued.eq(0)]
                    m.next = "XLOAD"
            with m.State("XLOAD"):
                issue_weights()
                m.d.comb += [self.rd_cmd.valid.eq(1), self.rd_cmd.payload.addr.eq(self.io + src_off),
                             self.rd_cmd.payload.beats.eq(stride8 >> lgWb)]
                with m.If(self.rd_cmd.ready):
                    m.d.sync += xb.eq(0)
                    m.next = "XRX"
            with m.State("XRX"):
                issue_weights()
                m.d.comb += [self.rd_data.ready.eq(1), eng.x_data.eq(self.rd_data.payload),
                             eng.x_addr.eq(xb - 64 // Wb), eng.x_we.eq(self.rd_data.valid & (xb >= 64 // Wb))]
                with m.If(self.rd_data.valid):
                    m.d.sync += xb.eq(xb + 1)
                    with m.If(xb == 0):
                        m.d.sync += [eng.ma.eq(self.rd_data.payload[0:16]), eng.ea.eq(self.rd_data.payload[16:24])]
                    with m.If(xb == (stride8 >> lgWb) - 1):
                        m.d.sync += started.eq(0)
                        m.next = "RUN"
            with m.State("RUN"):
                issue_weights()
                m.d.comb += eng.start.eq(~started)
                m.d.sync += started.eq(1)
                with m.If(started & (issued[:P] == (1 << P) - 1) & ~eng.busy):
                    m.d.sync += [qi.eq(0), qo.eq(0), dv.eq(0), acc_mode.eq(fl[0]), issued.eq(0)]
                    m.next = "WB"
            with m.State("WB"):
                # commands: write the X32 row (and read it first for F_ACC)
                m.d.comb += [self.wr_cmd.payload.addr.eq(self.io + dst_off), self.wr_cmd.payload.beats.eq(nb),
                             self.rd_cmd.payload.addr.eq(self.io + dst_off), self.rd_cmd.payload.beats.eq(nb),
                             self.wr_cmd.valid.eq(~issued[0]), self.rd_cmd.valid.eq(acc_mode & ~issued[1])]
                with m.If(self.wr_cmd.valid & self.wr_cmd.ready):
                    m.d.sync += issued[0].eq(1)
                with m.If(self.rd_cmd.valid & self.rd_cmd.ready):
                    m.d.sync += issued[1].eq(1)
                # data: output memory rows (1-cycle read) -> (+ old row, saturating) -> write DMA
                fire = self.wr_data.valid & self.wr_data.ready
                load = ~dv | fire
                m.d.comb += [eng.o_raddr.eq(qi), eng.o_ren.eq(load)]
                with m.If(load):
                    m.d.sync += dv.eq(qi < nb)
                    with m.If(qi < nb):
                        m.d.sync += qi.eq(qi + 1)
                words = []
                for i in range(W // 32):
                    o = eng.o_rdata[32 * i: 32 * i + 32].as_signed()
                    old = self.rd_data.payload[32 * i: 32 * i + 32].as_signed()
                    s = sat_const(m, o + old, 32, f"wb_sum{i}")
                    words.append(Mux(acc_mode, s, o))
                rembytes = Signal(32)
                m.d.comb += rembytes.eq((N << 2) - (qo << lgWb))
                strb = Signal(Wb)
                m.d.comb += strb.eq(Mux(rembytes >= Wb, (1 << Wb) - 1, (Const(1, Wb + 1) << rembytes[:lgWb + 1]) - 1))
                m.d.comb += [self.wr_data.payload.data.eq(Cat(*words)), self.wr_data.payload.strb.eq(strb),
                             self.wr_data.valid.eq(dv & (~acc_mode | self.rd_data.valid)),
                             self.rd_data.ready.eq(acc_mode & dv & self.wr_data.ready)]
                with m.If(fire):
                    m.d.sync += qo.eq(qo + 1)
                with m.If((qo == nb) & issued[0] & (issued[1] | ~acc_mode) & ~self.wr_busy):
                    with m.If(t + 1 >= t_end):
                        m.next = "DONE"
                    with m.Else():
                        m.d.sync += [t.eq(t + 1), src_off.eq(src_off + stride8), dst_off.eq(dst_off + stride32),
                                     issued.eq(0)]
                        m.next = "XLOAD"
        return m


# opcode -> execution unit class (MATMUL here; EMBED, RMSNORM, QUANT, SILUMUL, ADD, ARGMAX in units.py;
# ATTN and TOPK in attn_unit.py / topk_unit.py)
UNITS: dict[int, type] = {isa.MATMUL: MatmulUnit, **ROW_UNITS, isa.ATTN: AttnUnit, isa.TOPK: TopkUnit}


def unit_flags(op: int, cls) -> int:
    """Flag bits of *op* the unit implements: its ``FLAGS`` (default: every flag the ISA defines)."""
    return isa.OPS[op].flags & getattr(cls, "FLAGS", isa.OPS[op].flags)


class Kernel(wiring.Component):
    def __init__(self, cfg: HWConfig, units: dict[int, type] | None = None):
        self.cfg = cfg
        self.units = dict(UNITS if units is None else units)
        for op in self.units:
            if op not in isa.OPS:
                raise AccllmError(f"unit registered for unknown opcode 0x{op:02x}")
        axi = axi4_signature(cfg.port_width_bits)
        super().__init__({**vitis_members(), "s_axi_control": In(axil_signature(ControlSlave.ADDR_W)),
                          "interrupt": Out(1), "m_axi_ctrl": Out(axi), "m_axi_w": Out(axi).array(cfg.weight_ports)})

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        vitis_domain(m, self)
        W, P = cfg.port_width_bits, cfg.weight_ports
        Wb = W // 8
        m.submodules.ctl = ctl = ControlSlave(cfg)
        wiring.connect(m, wiring.flipped(self.s_axi_control), ctl.bus)
        m.d.comb += self.interrupt.eq(ctl.interrupt)
        # m_axi_ctrl: program fetch and the units' io / kv traffic; m_axi_w<p>: weight port p. Each port
        # has a read DMA on its read channels and a write DMA on its write channels.
        m.submodules.rd = rd = ReadDMA(W, cfg.burst_beats, cfg.outstanding_reads)
        m.submodules.wr = wr = WriteDMA(W, cfg.burst_beats, cfg.outstanding_reads)
        connect_channels(m, self.m_axi_ctrl, rd.axi, wr.axi)
        wrd = [ReadDMA(W, cfg.burst_beats, cfg.outstanding_reads) for p in range(P)]
        wwr = [WriteDMA(W, cfg.burst_beats, cfg.outstanding_reads) for p in range(P)]
        for p in range(P):
            m.submodules[f"rd_w{p}"], m.submodules[f"wr_w{p}"] = wrd[p], wwr[p]
            connect_channels(m, self.m_axi_w[p], wrd[p].axi, wwr[p].axi)

        units = {}
        for op, cls in self.units.items():
            u = cls(cfg)
            m.submodules[f"unit_{isa.OPS[op].name.lower()}"] = u
            units[op] = u
            m.d.comb += [u.position.eq(ctl.arg_position), u.n_tokens.eq(ctl.arg_n_tokens), u.flags.eq(ctl.arg_flags),
                         u.kv.eq(ctl.arg_kv), u.io.eq(ctl.arg_io), u.wr_busy.eq(wr.busy)]
            for p in range(P):
                m.d.comb += [u.weights[p].eq(ctl.arg_weights[p]), u.ww_busy[p].eq(wwr[p].busy)]

        # ---- sequencer
        busy = Signal()
        pc = Signal(32)
        cycles = Signal(64)
        status = Signal(32)
        ibuf = Signal(W)
        ibuf_addr = Signal(64)
        ibuf_ok = Signal()
        active = Signal(range(max(2, len(units) + 1)))     # 0 = none, i+1 = units[i]
        ops = list(units)
        m.d.comb += [ctl.busy.eq(busy), ctl.ro_status.eq(status), ctl.ro_cycles_lo.eq(cycles[:32]),
                     ctl.ro_cycles_hi.eq(cycles[32:])]
        with m.If(busy):
            m.d.sync += cycles.eq(cycles + 1)
        beat_addr = Signal(64)
        m.d.comb += beat_addr.eq(ctl.arg_program + ((pc << 4) & ~(Wb - 1)))
        word = Signal(128)
        m.d.comb += word.eq(ibuf.word_select(pc[:(Wb // 16).bit_length() - 1] if Wb > 16 else 0, 128))
        fd = _fields(word)
        legal = Signal()
        with m.Switch(fd["op"]):
            for op, spec in isa.OPS.items():
                with m.Case(op):
                    # a flag this build's unit does not implement is illegal here (STATUS_BAD_OPCODE)
                    fl = unit_flags(op, self.units[op]) if op in self.units else spec.flags
                    ok = (fd["flags"] & ~fl) == 0
                    for fname in ("a", "b", "c", "d"):
                        if fname not in spec.fields:
                            ok = ok & (fd[fname] == 0)
                    m.d.comb += legal.eq(ok)
        done = Signal()
        m.d.comb += ctl.done.eq(done)

        def fail(code):
            return [status.eq(code | (pc[:24] << 8))]

        # DMA ownership: the fetcher in FETCH states, else the active unit
        fetch_cmd = Signal()
        fetch_take = Signal()
        with m.If(active == 0):
            m.d.comb += [rd.cmd.valid.eq(fetch_cmd), rd.cmd.payload.addr.eq(beat_addr), rd.cmd.payload.beats.eq(1),
                         rd.data.ready.eq(fetch_take)]
        # Read data payloads go to every unit unconditionally (only valid/ready are switched), and the
        # weight-port write payloads come straight from the one unit that writes weight ports (units
        # say so with WRITES_WEIGHTS, and name the ports in WRITE_PORTS unless they write every port; a
        # port with two writers gets a multiplexer): on a 32-port u280 build a 512-bit gate or multiplexer
        # per unit and port costs tens of thousands of LUTs.
        writers = [op for op in ops if getattr(units[op], "WRITES_WEIGHTS", False)]

        def port_writers(p):        # units that write weight port p (WRITE_PORTS: default every port)
            return [op for op in writers if p in getattr(units[op], "WRITE_PORTS", range(P))]
        for op in ops:
            u = units[op]
            m.d.comb += u.rd_data.payload.eq(rd.data.payload)
            for p in range(P):
                m.d.comb += u.w_data[p].payload.eq(wrd[p].data.payload)
        for p in range(P):
            if len(port_writers(p)) == 1:
                m.d.comb += wwr[p].data.payload.eq(units[port_writers(p)[0]].ww_data[p].payload)
        for i, op in enumerate(ops):
            u = units[op]
            with m.If(active == i + 1):
                # the active unit's command streams and ctrl-port write data, whole; of the other
                # data streams only valid / ready (their payloads are wired above)
                wiring.connect(m, u.rd_cmd, rd.cmd)
                wiring.connect(m, u.wr_cmd, wr.cmd)
                wiring.connect(m, u.wr_data, wr.data)
                m.d.comb += [u.rd_data.valid.eq(rd.data.valid), rd.data.ready.eq(u.rd_data.ready)]
                for p in range(P):
                    wiring.connect(m, u.w_cmd[p], wrd[p].cmd)
                    wiring.connect(m, u.ww_cmd[p], wwr[p].cmd)
                    ud, wd = u.w_data[p], u.ww_data[p]
                    m.d.comb += [ud.valid.eq(wrd[p].data.valid), wrd[p].data.ready.eq(ud.ready),
                                 wwr[p].data.valid.eq(wd.valid), wd.ready.eq(wwr[p].data.ready)]
                    if len(port_writers(p)) > 1 and op in port_writers(p):
                        m.d.comb += wwr[p].data.payload.eq(wd.payload)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(ctl.start):
                    m.d.sync += [busy.eq(1), pc.eq(ctl.arg_entry), cycles.eq(0), status.eq(0), ibuf_ok.eq(0),
                                 active.eq(0)]
                    m.next = "FETCH"
            with m.State("FETCH"):
                with m.If(pc >= ctl.arg_program_len):
                    m.d.sync += fail(regmap.STATUS_NO_END)
                    m.next = "DONE"
                with m.Elif(ibuf_ok & (ibuf_addr == beat_addr)):
                    m.next = "DECODE"
                with m.Else():
                    m.d.comb += fetch_cmd.eq(1)
                    with m.If(rd.cmd.ready):
                        m.next = "FETCH_RX"
            with m.State("FETCH_RX"):
                m.d.comb += fetch_take.eq(1)
                with m.If(rd.data.valid):
                    m.d.sync += [ibuf.eq(rd.data.payload), ibuf_addr.eq(beat_addr), ibuf_ok.eq(1)]
                    m.next = "DECODE"
            with m.State("DECODE"):
                with m.If(~legal):
                    m.d.sync += fail(regmap.STATUS_BAD_OPCODE)
                    m.next = "DONE"
                with m.Elif(fd["op"] == isa.END):
                    m.next = "DONE"
                with m.Elif(fd["op"] == isa.NOP):
                    m.d.sync += pc.eq(pc + 1)
                    m.next = "FETCH"
                with m.Else():
                    dispatched = Const(0)
                    for i, op in enumerate(ops):
                        hit = fd["op"] == op
                        dispatched = dispatched | hit
                        with m.If(hit):
                            m.d.comb += [units[op].start.eq(1)]
                            m.d.sync += active.eq(i + 1)
                    for op in ops:
                        m.d.comb += units[op].word.eq(word)
                    with m.If(dispatched):
                        m.next = "EXEC"
                    with m.Else():
                        m.d.sync += fail(regmap.STATUS_BAD_OPCODE)   # a legal opcode without a unit here
                        m.next = "DONE"
            with m.State("EXEC"):
                for i, op in enumerate(ops):
                    u = units[op]
                    with m.If((active == i + 1) & u.done):
                        m.d.sync += active.eq(0)
                        with m.If(u.status != 0):
                            m.d.sync += fail(u.status)
                            m.next = "DONE"
                        with m.Else():
                            m.d.sync += pc.eq(pc + 1)
                            m.next = "FETCH"
            with m.State("DONE"):
                m.d.comb += done.eq(1)
                m.d.sync += busy.eq(0)
                m.next = "IDLE"
        return m


def kernel_verilog(cfg: HWConfig) -> str:
    from .tops import to_verilog
    return to_verilog(Kernel(cfg), "accllm_kernel")
