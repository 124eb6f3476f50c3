"""AXI plumbing of the kernel: signatures, the ``s_axi_control`` slave, the read and write DMAs.

Conventions
- Interfaces are described from the *master's* point of view (``Out`` = driven by the master) and
  member names are the AXI signal names without prefix (``araddr``, ``rvalid``...). The tops name
  their ports ``m_axi_<port>_<signal>`` / ``s_axi_control_<signal>`` so Vitis infers them
  (hw/rtl/tops.py ``vitis_ports``).
- An AXI4 master port is driven by two DMAs, the read channels by a :class:`ReadDMA`, the write
  channels by a :class:`WriteDMA` (:func:`connect_channels`).
- The read DMA issues INCR bursts of at most ``burst_beats`` beats that never cross a
  ``burst_beats * bytes`` boundary (so never a 4 KiB one) and keeps up to ``outstanding`` bursts in
  flight. It only issues a burst when its FIFO has room for every beat of every burst in flight
  (credit based), so ``rready`` never drops because of the DMA itself and the interconnect is never
  blocked; with ``outstanding * burst_beats`` beats of credit it hides ``outstanding * burst_beats``
  cycles of read latency (256 with the defaults, against the ≥ 100 required).
"""
from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from algo.common import AccllmError
from hw import regmap

ADDR_W = 64
ID_W = 1


def axi4_signature(data_w: int, addr_w: int = ADDR_W, id_w: int = ID_W) -> wiring.Signature:
    """A full AXI4 master interface (subset Vitis accepts: no lock/cache/prot/qos/region)."""
    return wiring.Signature({
        "awid": Out(id_w), "awaddr": Out(addr_w), "awlen": Out(8), "awsize": Out(3), "awburst": Out(2),
        "awvalid": Out(1), "awready": In(1),
        "wdata": Out(data_w), "wstrb": Out(data_w // 8), "wlast": Out(1), "wvalid": Out(1), "wready": In(1),
        "bid": In(id_w), "bresp": In(2), "bvalid": In(1), "bready": Out(1),
        "arid": Out(id_w), "araddr": Out(addr_w), "arlen": Out(8), "arsize": Out(3), "arburst": Out(2),
        "arvalid": Out(1), "arready": In(1),
        "rid": In(id_w), "rdata": In(data_w), "rresp": In(2), "rlast": In(1), "rvalid": In(1), "rready": Out(1),
    })


READ_MEMBERS = ("arid", "araddr", "arlen", "arsize", "arburst", "arvalid", "arready",
                "rid", "rdata", "rresp", "rlast", "rvalid", "rready")
WRITE_MEMBERS = ("awid", "awaddr", "awlen", "awsize", "awburst", "awvalid", "awready",
                 "wdata", "wstrb", "wlast", "wvalid", "wready", "bid", "bresp", "bvalid", "bready")


def axil_signature(addr_w: int = 12, data_w: int = 32) -> wiring.Signature:
    return wiring.Signature({
        "awaddr": Out(addr_w), "awvalid": Out(1), "awready": In(1),
        "wdata": Out(data_w), "wstrb": Out(data_w // 8), "wvalid": Out(1), "wready": In(1),
        "bresp": In(2), "bvalid": In(1), "bready": Out(1),
        "araddr": Out(addr_w), "arvalid": Out(1), "arready": In(1),
        "rdata": In(data_w), "rresp": In(2), "rvalid": In(1), "rready": Out(1),
    })


class _Channels:
    """The members of the interface *iface* that the signature *sig* names, as an interface of *sig*."""

    def __init__(self, iface, sig: wiring.Signature):
        self.signature = sig
        for name in sig.members:
            setattr(self, name, getattr(iface, name))


def connect_channels(m: Module, port, *dma_axis) -> None:
    """Drive the AXI4 master *port* of the module being elaborated (a member of its own signature)
    from the ``axi`` interfaces of its DMAs, each a subset of the channels (:data:`READ_MEMBERS`,
    :data:`WRITE_MEMBERS`); together they cover every member."""
    names = sorted(n for ax in dma_axis for n in ax.signature.members)
    if names != sorted(port.signature.members):
        raise AccllmError(f"DMA channels {names} do not make up the AXI4 port")
    for ax in dma_axis:
        wiring.connect(m, ax, wiring.flipped(_Channels(port, ax.signature)))


def _log2(n: int) -> int:
    if n <= 0 or n & (n - 1):
        raise AccllmError(f"{n} is not a power of two")
    return n.bit_length() - 1


XFER = data.StructLayout({"addr": ADDR_W, "beats": 32})


class ReadDMA(wiring.Component):
    """Streams ``beats`` data beats starting at byte address ``addr`` (beat aligned) onto ``data``.

    Commands are accepted one at a time (``cmd.ready`` when the previous one has issued all its
    bursts; data of consecutive commands follow each other in order). ``error`` is sticky until the
    next command: a burst came back with RRESP != OKAY.
    """

    def __init__(self, data_w: int, burst_beats: int = 16, outstanding: int = 16):
        self.data_w, self.burst_beats, self.outstanding = data_w, burst_beats, outstanding
        self.lg_bytes = _log2(data_w // 8)
        self.lg_burst = _log2(burst_beats)
        if burst_beats > 256 or burst_beats * data_w // 8 > 4096:
            raise AccllmError(f"burst of {burst_beats} beats x {data_w // 8} B exceeds AXI4 limits "
                              "(256 beats, 4 KiB)")
        self.depth = burst_beats * outstanding
        super().__init__({
            "cmd": In(stream.Signature(XFER)),
            "data": Out(stream.Signature(data_w)),
            "axi": Out(wiring.Signature({k: v for k, v in axi4_signature(data_w).members.items()
                                         if k in READ_MEMBERS})),
            "busy": Out(1),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.fifo = q = fifo.SyncFIFOBuffered(width=self.data_w, depth=self.depth)
        addr = Signal(ADDR_W)
        remaining = Signal(32)
        reserved = Signal(range(self.depth + 1))      # FIFO beats promised to bursts in flight
        inflight = Signal(range(self.outstanding + 1))

        in_burst = (addr >> self.lg_bytes)[:self.lg_burst]
        room = Signal(self.lg_burst + 1)
        m.d.comb += room.eq(self.burst_beats - in_burst)
        blen = Signal(self.lg_burst + 1)
        m.d.comb += blen.eq(Mux(remaining < room, remaining, room))

        ax = self.axi
        can_issue = ((remaining != 0) & (reserved + blen <= self.depth) & (inflight < self.outstanding)
                     )
        m.d.comb += [
            ax.arid.eq(0), ax.araddr.eq(addr), ax.arlen.eq(blen - 1), ax.arsize.eq(self.lg_bytes),
            ax.arburst.eq(1), ax.arvalid.eq(can_issue),
            self.cmd.ready.eq(remaining == 0),
        ]
        ar_fire = ax.arvalid & ax.arready
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [addr.eq(self.cmd.payload.addr), remaining.eq(self.cmd.payload.beats),
                         self.error.eq(0)]
        with m.Elif(ar_fire):
            m.d.sync += [addr.eq(addr + (blen << self.lg_bytes)), remaining.eq(remaining - blen)]

        r_fire = ax.rvalid & ax.rready
        m.d.comb += [ax.rready.eq(q.w_rdy), q.w_data.eq(ax.rdata), q.w_en.eq(ax.rvalid)]
        with m.If(r_fire & (ax.rresp != 0)):
            m.d.sync += self.error.eq(1)
        m.d.sync += inflight.eq(inflight + ar_fire - (r_fire & ax.rlast))

        pop = self.data.valid & self.data.ready
        m.d.comb += [self.data.payload.eq(q.r_data), self.data.valid.eq(q.r_rdy), q.r_en.eq(self.data.ready)]
        m.d.sync += reserved.eq(reserved + Mux(ar_fire, blen, 0) - pop)
        m.d.comb += self.busy.eq((remaining != 0) | (reserved != 0) | (inflight != 0))
        return m


def write_beat(data_w: int) -> data.StructLayout:
    return data.StructLayout({"data": data_w, "strb": data_w // 8})


class WriteDMA(wiring.Component):
    """Writes ``beats`` beats from ``data`` (payload: data + byte strobes) starting at ``addr``.

    AW bursts follow the same alignment rules as the read DMA; AW may run ahead of W. ``busy`` stays
    high until every B response has come back; ``error`` is sticky until the next command.
    """

    def __init__(self, data_w: int, burst_beats: int = 16, outstanding: int = 16):
        self.data_w, self.burst_beats, self.outstanding = data_w, burst_beats, outstanding
        self.lg_bytes = _log2(data_w // 8)
        self.lg_burst = _log2(burst_beats)
        self.beat = write_beat(data_w)
        super().__init__({
            "cmd": In(stream.Signature(XFER)),
            "data": In(stream.Signature(self.beat)),
            "axi": Out(wiring.Signature({k: v for k, v in axi4_signature(data_w).members.items()
                                         if k in WRITE_MEMBERS})),
            "busy": Out(1),
            "error": Out(1),
        })

    def _blen(self, m, addr, remaining, name):
        in_burst = (addr >> self.lg_bytes)[:self.lg_burst]
        room = Signal(self.lg_burst + 1, name=f"{name}_room")
        blen = Signal(self.lg_burst + 1, name=f"{name}_blen")
        m.d.comb += [room.eq(self.burst_beats - in_burst), blen.eq(Mux(remaining < room, remaining, room))]
        return blen

    def elaborate(self, platform):
        m = Module()
        ax = self.axi
        aw_addr, aw_rem = Signal(ADDR_W), Signal(32)
        w_addr, w_rem = Signal(ADDR_W), Signal(32)
        w_cnt = Signal(self.lg_burst + 1)
        b_pend = Signal(range(self.outstanding + 1))
        aw_len = self._blen(m, aw_addr, aw_rem, "aw")
        w_len = self._blen(m, w_addr, w_rem, "w")

        idle = (aw_rem == 0) & (w_rem == 0)
        m.d.comb += self.cmd.ready.eq(idle)
        with m.If(self.cmd.valid & idle):
            m.d.sync += [aw_addr.eq(self.cmd.payload.addr), aw_rem.eq(self.cmd.payload.beats),
                         w_addr.eq(self.cmd.payload.addr), w_rem.eq(self.cmd.payload.beats),
                         w_cnt.eq(0), self.error.eq(0)]

        m.d.comb += [ax.awid.eq(0), ax.awaddr.eq(aw_addr), ax.awlen.eq(aw_len - 1), ax.awsize.eq(self.lg_bytes),
                     ax.awburst.eq(1), ax.awvalid.eq((aw_rem != 0) & (b_pend < self.outstanding))]
        aw_fire = ax.awvalid & ax.awready
        with m.If(aw_fire):
            m.d.sync += [aw_addr.eq(aw_addr + (aw_len << self.lg_bytes)), aw_rem.eq(aw_rem - aw_len)]

        last = w_cnt == w_len - 1
        m.d.comb += [ax.wdata.eq(self.data.payload.data), ax.wstrb.eq(self.data.payload.strb),
                     ax.wlast.eq(last), ax.wvalid.eq(self.data.valid & (w_rem != 0)),
                     self.data.ready.eq(ax.wready & (w_rem != 0))]
        w_fire = ax.wvalid & ax.wready
        with m.If(w_fire):
            with m.If(last):
                m.d.sync += [w_cnt.eq(0), w_addr.eq(w_addr + (w_len << self.lg_bytes)), w_rem.eq(w_rem - w_len)]
            with m.Else():
                m.d.sync += w_cnt.eq(w_cnt + 1)

        m.d.comb += ax.bready.eq(1)
        b_fire = ax.bvalid & ax.bready
        with m.If(b_fire & (ax.bresp != 0)):
            m.d.sync += self.error.eq(1)
        m.d.sync += b_pend.eq(b_pend + aw_fire - b_fire)
        m.d.comb += self.busy.eq(~idle | (b_pend != 0))
        return m


class ControlSlave(wiring.Component):
    """``s_axi_control``: the Vitis ap_ctrl_hs block and the kernel arguments of hw/regmap.py.

    To the kernel: ``start`` (one-cycle pulse when the host's ap_start is taken), the argument
    values (``arg_<name>``; the weight-port pointers as the array ``arg_weights``). From the kernel:
    ``done`` (pulse), ``busy`` and the read-only words (``ro_<name>``). ap_done and ap_ready are
    clear-on-read, ISR is toggle-on-write, the interrupt is GIE & |(ISR & IER).
    """

    ADDR_W = 12

    def __init__(self, cfg):
        self.args = regmap.arguments(cfg)
        last = max(a.offset + (8 if a.kind == "ptr" else 4) for a in self.args)
        if last > (1 << self.ADDR_W):
            raise AccllmError(f"register map needs {last} bytes, s_axi_control has {1 << self.ADDR_W}")
        weights = {regmap.weights_arg(p) for p in range(cfg.weight_ports)}
        members = {"bus": In(axil_signature(self.ADDR_W)), "start": Out(1), "done": In(1), "busy": In(1),
                   "interrupt": Out(1), "arg_weights": Out(64).array(cfg.weight_ports)}
        for a in self.args:
            if a.name in weights:
                continue
            if a.kind == "ptr":
                members[f"arg_{a.name}"] = Out(64)
            elif a.kind == "u32":
                members[f"arg_{a.name}"] = Out(32)
            else:
                members[f"ro_{a.name}"] = In(32)
        super().__init__(members)
        # argument name -> its register (arg_weights[p] for weights<p>)
        self.regs = {a.name: getattr(self, ("ro_" if a.kind == "ro32" else "arg_") + a.name)
                     for a in self.args if a.name not in weights}
        self.regs.update({regmap.weights_arg(p): self.arg_weights[p] for p in range(cfg.weight_ports)})

    def elaborate(self, platform):
        m = Module()
        b = self.bus
        ap_start, ap_done, ap_ready, auto_restart = Signal(), Signal(), Signal(), Signal()
        gie, ier, isr = Signal(), Signal(2), Signal(2)

        # --- read channel: one outstanding read, data valid the cycle after the address
        rdata = Signal(32)
        rvalid = Signal()
        m.d.comb += [b.arready.eq(~rvalid), b.rvalid.eq(rvalid), b.rdata.eq(rdata), b.rresp.eq(0)]
        with m.If(rvalid & b.rready):
            m.d.sync += rvalid.eq(0)
        read_ctrl = Signal()
        with m.If(b.arvalid & b.arready):
            m.d.sync += rvalid.eq(1)
            addr = b.araddr & ~3
            with m.Switch(addr):
                with m.Case(regmap.AP_CTRL):
                    m.d.sync += rdata.eq(Cat(ap_start, ap_done, ~self.busy & ~ap_start, ap_ready,
                                             Const(0, 3), auto_restart))
                    m.d.comb += read_ctrl.eq(1)
                with m.Case(regmap.GIE):
                    m.d.sync += rdata.eq(gie)
                with m.Case(regmap.IER):
                    m.d.sync += rdata.eq(ier)
                with m.Case(regmap.ISR):
                    m.d.sync += rdata.eq(isr)
                for a in self.args:
                    reg = self.regs[a.name]
                    if a.kind == "ptr":
                        with m.Case(a.offset):
                            m.d.sync += rdata.eq(reg[:32])
                        with m.Case(a.offset + 4):
                            m.d.sync += rdata.eq(reg[32:])
                    else:
                        with m.Case(a.offset):
                            m.d.sync += rdata.eq(reg)
                with m.Default():
                    m.d.sync += rdata.eq(0)

        # --- write channel: take AW and W together, answer with B
        bvalid = Signal()
        take = b.awvalid & b.wvalid & ~bvalid
        m.d.comb += [b.awready.eq(take), b.wready.eq(take), b.bvalid.eq(bvalid), b.bresp.eq(0)]
        with m.If(bvalid & b.bready):
            m.d.sync += bvalid.eq(0)

        def merge(reg, word, lo):
            # byte-strobed update of reg[lo:lo+32]
            for i in range(4):
                with m.If(b.wstrb[i]):
                    m.d.sync += reg[lo + 8 * i: lo + 8 * i + 8].eq(word[8 * i: 8 * i + 8])

        host_start = Signal()
        with m.If(take):
            m.d.sync += bvalid.eq(1)
            with m.Switch(b.awaddr & ~3):
                with m.Case(regmap.AP_CTRL):
                    with m.If(b.wstrb[0]):
                        m.d.comb += host_start.eq(b.wdata[0])
                        m.d.sync += auto_restart.eq(b.wdata[7])
                with m.Case(regmap.GIE):
                    with m.If(b.wstrb[0]):
                        m.d.sync += gie.eq(b.wdata[0])
                with m.Case(regmap.IER):
                    with m.If(b.wstrb[0]):
                        m.d.sync += ier.eq(b.wdata[:2])
                for a in self.args:
                    if a.kind == "ro32":
                        continue
                    reg = self.regs[a.name]
                    with m.Case(a.offset):
                        merge(reg, b.wdata, 0)
                    if a.kind == "ptr":
                        with m.Case(a.offset + 4):
                            merge(reg, b.wdata, 32)

        # --- ap_ctrl_hs handshake
        taken = ap_start & ~self.busy
        m.d.comb += self.start.eq(taken)
        with m.If(host_start):
            m.d.sync += ap_start.eq(1)
        with m.Elif(taken & ~auto_restart):
            m.d.sync += ap_start.eq(0)
        # done/ready: set by the kernel, cleared when the host reads AP_CTRL (a set wins over the clear)
        with m.If(self.done):
            m.d.sync += [ap_done.eq(1), ap_ready.eq(1)]
        with m.Elif(read_ctrl):
            m.d.sync += [ap_done.eq(0), ap_ready.eq(0)]
        # ISR: bit 0 done, bit 1 ready; toggle-on-write
        isr_next = Signal(2)
        m.d.comb += isr_next.eq(isr | Mux(self.done, ier & 0b11, 0))
        with m.If(take & ((b.awaddr & ~3) == regmap.ISR) & b.wstrb[0]):
            m.d.sync += isr.eq(isr_next ^ b.wdata[:2])
        with m.Else():
            m.d.sync += isr.eq(isr_next)
        m.d.comb += self.interrupt.eq(gie & (isr != 0))
        return m
