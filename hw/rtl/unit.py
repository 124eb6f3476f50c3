"""What every execution unit of the kernel shares: the signature it implements towards the sequencer
(hw/rtl/kernel.py), the decoding of its instruction word and the start / status / done handshake
(:class:`Unit`)."""
from __future__ import annotations

from contextlib import contextmanager

from amaranth import Cat, Const, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.config import HWConfig

from .axi import XFER, write_beat


def unit_signature(cfg: HWConfig) -> wiring.Signature:
    W = cfg.port_width_bits
    beat = write_beat(W)
    members = {
        "start": In(1), "word": In(128), "done": Out(1), "status": Out(8),
        "position": In(32), "n_tokens": In(32), "flags": In(32),
        "kv": In(64), "io": In(64),
        "rd_cmd": Out(stream.Signature(XFER)), "rd_data": In(stream.Signature(W)),
        "wr_cmd": Out(stream.Signature(XFER)), "wr_data": Out(stream.Signature(beat)), "wr_busy": In(1),
    }
    P = cfg.weight_ports
    members.update({
        "weights": In(64).array(P),                          # the weights<p> buffer addresses
        "w_cmd": Out(stream.Signature(XFER)).array(P), "w_data": In(stream.Signature(W)).array(P),
        # write path of the weight ports (the KV cache lives in the weight buffers: hw/compiler.py)
        "ww_cmd": Out(stream.Signature(XFER)).array(P), "ww_data": Out(stream.Signature(beat)).array(P),
        "ww_busy": In(1).array(P),
    })
    return wiring.Signature(members)


def _fields(word):
    return dict(op=word[0:8], flags=word[8:16], c=word[16:32], a=word[32:64], b=word[64:96], d=word[96:128])


def _end64(base, extent):
    """True when [base, base + extent) runs past the 4 GiB offset space of a buffer argument."""
    return (Cat(base, Const(0, 32)) + extent) > (1 << 32)


class Unit(wiring.Component):
    """An execution unit: :func:`unit_signature` and the handshake every unit runs in its FSM
    (:meth:`fsm`). IDLE waits for ``start``, then registers the instruction fields the unit asked for
    (:meth:`fields`) and clears ``status``; a state ends the instruction with :meth:`end` (a status
    code, or OK) or by going to DONE; DONE pulses ``done`` and returns to IDLE. ``status`` holds the
    code until the next start.

    Also the port geometry: ``W`` bits (``Wb`` bytes, ``lgWb``) and ``WPB`` int32 words (``lgWPB``)
    per beat."""

    def __init__(self, cfg: HWConfig):
        self.cfg = cfg
        self.W = cfg.port_width_bits
        self.Wb = self.W // 8
        self.lgWb = self.Wb.bit_length() - 1
        self.WPB = self.W // 32
        self.lgWPB = self.WPB.bit_length() - 1
        self._loads = []
        super().__init__(unit_signature(cfg))

    def fields(self, *names: str) -> list[Signal]:
        """Registers for the instruction fields *names* (``a``, ``b``, ``c``, ``d``, ``flags``), loaded
        from ``word`` when an instruction starts."""
        word = _fields(self.word)
        regs = [Signal(len(word[n]), name=f"word_{n}") for n in names]
        self._loads += [r.eq(word[n]) for r, n in zip(regs, names)]
        return regs

    def _beats(self, nbytes):
        return (nbytes + self.Wb - 1) >> self.lgWb

    @contextmanager
    def fsm(self, m, first: str, on_start=()):
        """The unit's FSM: IDLE, the states defined in the with-block, DONE. On ``start`` IDLE loads
        the :meth:`fields`, clears the status, adds the statements *on_start* and goes to *first*."""
        loads, self._loads = self._loads, []
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [*loads, self.status.eq(0), *on_start]
                    m.next = first
            yield
            with m.State("DONE"):
                m.d.comb += self.done.eq(1)
                m.next = "IDLE"

    def end(self, m, code: int = 0) -> None:
        """In a state of :meth:`fsm`: end the instruction with status *code* (0, OK: the status is
        still the one start cleared)."""
        if code:
            m.d.sync += self.status.eq(code)
        m.next = "DONE"

    @contextmanager
    def checks(self, m, *tests):
        """The first of the (condition, status code) *tests* that holds ends the instruction with its
        code (:meth:`end`); the with-block runs when none does."""
        for i, (cond, code) in enumerate(tests):
            with (m.Elif if i else m.If)(cond):
                self.end(m, code)
        with m.Else():
            yield
