"""A minimal Amaranth component used to prove the RTL toolchain works end to end
(Amaranth → Verilog → cocotb on Verilator and Icarus). It is a stream accumulator: every
accepted input adds to a running sum, and the sum is presented on the output stream."""
from __future__ import annotations

from amaranth import Module, Signal, unsigned
from amaranth.back import verilog
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out


class StreamAccumulator(wiring.Component):
    def __init__(self, width: int = 8, acc_width: int = 16):
        self.width, self.acc_width = width, acc_width
        super().__init__({
            "i": In(stream.Signature(unsigned(width))),
            "o": Out(stream.Signature(unsigned(acc_width))),
            "clear": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        acc = Signal(self.acc_width)
        m.d.comb += [self.o.payload.eq(acc), self.i.ready.eq(~self.o.valid | self.o.ready)]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.clear):
            m.d.sync += [acc.eq(0), self.o.valid.eq(0)]
        with m.Elif(self.i.valid & self.i.ready):
            m.d.sync += [acc.eq(acc + self.i.payload), self.o.valid.eq(1)]
        return m


def export(path, width: int = 8, acc_width: int = 16) -> None:
    from algo.common import atomic_write_text
    top = StreamAccumulator(width, acc_width)
    atomic_write_text(path, verilog.convert(top, name="stream_acc"))
