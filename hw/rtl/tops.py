"""Top-level wrappers: the Vitis clock/reset convention and the per-unit test tops.

Every top uses ``ap_clk`` and the active-low synchronous ``ap_rst_n`` (Vitis RTL-kernel rule)
and has its AXI interfaces as signature members (``m_axi_<port>``, arrays of them, ``s_axi_control``),
which become the flat ports ``m_axi_<port>_<signal>`` / ``s_axi_control_<signal>`` of the Verilog
(:func:`vitis_ports`). The unit tops (``DmaTop``, ``ControlTop``) exist so that each unit has its own
cocotb bench (sim/tb/<unit>/) with the same AXI models as the kernel-level bench.
"""
from __future__ import annotations

from amaranth import ClockDomain, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .axi import ControlSlave, ReadDMA, WriteDMA, axi4_signature, axil_signature, connect_channels


def vitis_members() -> dict:
    return {"ap_clk": In(1), "ap_rst_n": In(1)}


def vitis_name(path: tuple) -> str:
    """Port name of the member at *path* of a top's signature: the names joined with ``_``, an array
    index appended to its member's name (``("m_axi_w", 0, "araddr")`` -> ``m_axi_w0_araddr``)."""
    return path[0] + "".join(str(k) if isinstance(k, int) else f"_{k}" for k in path[1:])


def vitis_ports(top: wiring.Component) -> dict:
    """The ``ports`` of the Verilog / RTLIL conversion of *top* under their Vitis names (Amaranth's
    own names join the path with ``__``). Their directions come from what drives them: the tops
    drive every ``Out`` member (``connect_channels`` checks that each DMA pair covers its port)."""
    ports = {}
    for path, _member, value in top.signature.flatten(top):
        ports[vitis_name(path)] = (value, None)
    return ports


def vitis_domain(m: Module, top) -> None:
    """Drive the design's ``sync`` domain from ap_clk / ~ap_rst_n (no implicit clk/rst ports)."""
    m.domains.sync = cd = ClockDomain("sync")
    m.d.comb += [cd.clk.eq(top.ap_clk), cd.rst.eq(~top.ap_rst_n)]


class DmaTop(wiring.Component):
    """Read DMA + write DMA on one AXI4 master ``m_axi_mem``.

    ``start`` (pulse) launches a read of ``beats`` beats at ``src``; with ``copy`` set the beats are
    written to ``dst`` (write DMA), else they are consumed under ``sink_ready`` (the bench drives it
    to model a stalling consumer). Counters for the bench: ``first_cycle`` / ``last_cycle`` (cycle
    numbers, from start, of the first and last consumed beat) and ``consumed``.
    """

    def __init__(self, data_w: int = 256, burst_beats: int = 16, outstanding: int = 16):
        self.data_w, self.burst_beats, self.outstanding = data_w, burst_beats, outstanding
        super().__init__({**vitis_members(), "m_axi_mem": Out(axi4_signature(data_w)),
                          "start": In(1), "src": In(64), "dst": In(64), "beats": In(32), "copy": In(1),
                          "sink_ready": In(1), "busy": Out(1), "error": Out(1),
                          "first_cycle": Out(32), "last_cycle": Out(32), "consumed": Out(32)})

    def elaborate(self, platform):
        m = Module()
        vitis_domain(m, self)
        m.submodules.rd = rd = ReadDMA(self.data_w, self.burst_beats, self.outstanding)
        m.submodules.wr = wr = WriteDMA(self.data_w, self.burst_beats, self.outstanding)
        # one AXI port: the read channels from the read DMA, the write channels from the write DMA
        connect_channels(m, self.m_axi_mem, rd.axi, wr.axi)
        copy = Signal()
        cycle = Signal(32)
        pending = Signal()
        m.d.sync += cycle.eq(cycle + 1)
        with m.If(self.start):
            m.d.sync += [copy.eq(self.copy), cycle.eq(0), self.consumed.eq(0), self.first_cycle.eq(0),
                         self.last_cycle.eq(0), pending.eq(1)]
        m.d.comb += [rd.cmd.payload.addr.eq(self.src), rd.cmd.payload.beats.eq(self.beats),
                     wr.cmd.payload.addr.eq(self.dst), wr.cmd.payload.beats.eq(self.beats)]
        with m.If(pending):
            m.d.comb += [rd.cmd.valid.eq(1), wr.cmd.valid.eq(copy)]
            with m.If(rd.cmd.ready & (wr.cmd.ready | ~copy)):
                m.d.sync += pending.eq(0)
        with m.If(copy):
            m.d.comb += [wr.data.payload.data.eq(rd.data.payload), wr.data.payload.strb.eq(-1),
                         wr.data.valid.eq(rd.data.valid), rd.data.ready.eq(wr.data.ready)]
        with m.Else():
            m.d.comb += rd.data.ready.eq(self.sink_ready)
        with m.If(rd.data.valid & rd.data.ready):
            m.d.sync += [self.consumed.eq(self.consumed + 1), self.last_cycle.eq(cycle)]
            with m.If(self.consumed == 0):
                m.d.sync += self.first_cycle.eq(cycle)
        m.d.comb += [self.busy.eq(pending | rd.busy | wr.busy), self.error.eq(rd.error | wr.error)]
        return m


class ControlTop(wiring.Component):
    """``s_axi_control`` with a stand-in execution: on start it stays busy for ``n_tokens`` cycles,
    then reports STATUS = position & 0xff and the cycle count — enough to test ap_ctrl_hs (start,
    done, idle, ready, clear-on-read, interrupt) and every argument register from the bench."""

    def __init__(self, cfg):
        self.cfg = cfg
        super().__init__({**vitis_members(), "s_axi_control": In(axil_signature(ControlSlave.ADDR_W)),
                          "interrupt": Out(1)})

    def elaborate(self, platform):
        m = Module()
        vitis_domain(m, self)
        m.submodules.ctl = ctl = ControlSlave(self.cfg)
        wiring.connect(m, wiring.flipped(self.s_axi_control), ctl.bus)
        left = Signal(32)
        busy = Signal()
        cycles = Signal(64)
        status = Signal(32)
        m.d.comb += [ctl.busy.eq(busy), self.interrupt.eq(ctl.interrupt), ctl.ro_status.eq(status),
                     ctl.ro_cycles_lo.eq(cycles[:32]), ctl.ro_cycles_hi.eq(cycles[32:])]
        with m.If(ctl.start):
            m.d.sync += [busy.eq(1), left.eq(ctl.arg_n_tokens), cycles.eq(0)]
        with m.Elif(busy):
            m.d.sync += cycles.eq(cycles + 1)
            with m.If(left == 0):
                m.d.sync += [busy.eq(0), status.eq(ctl.arg_position[:8])]
                m.d.comb += ctl.done.eq(1)
            with m.Else():
                m.d.sync += left.eq(left - 1)
        return m


def to_verilog(top, name: str) -> str:
    from amaranth.back import verilog
    return verilog.convert(top, name=name, emit_src=False, ports=vitis_ports(top))
