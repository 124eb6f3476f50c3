"""Top-k engine: SpAtten-style quick-select over signed importance scores (32 or 64 bits), exactly the
selection of algo/topk.py (element a beats b iff s[a] > s[b], or equal and a < b; the k winners are
emitted as positions in ascending order).

Hardware quick-select over a score memory and three flag bits per position (candidate, picked,
better), one position per cycle:

  PIVOT   scan to the (c // 2)-th candidate in position order (the same deterministic pivot as
          algo/topk.py: the middle of the candidate list), latch its score and position;
  EVAL    scan the candidates, mark and count those that beat the pivot (b);
  UPDATE  b >= need: b == need -> picked |= better, finished; else candidates = better;
          b <  need: picked |= better + pivot, candidates -= better + pivot, need -= b + 1;
  OUT     scan the picked flags and emit the positions (ascending).

k == n picks everything without a round; k == 0 emits nothing. Each round costs about 3 scans of
n cycles; the expected number of rounds is O(log n).
"""
from __future__ import annotations

from amaranth import Cat, Module, Signal, signed
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from algo.common import AccllmError

CAND, PICK, BETTER = 0, 1, 2


class TopK(wiring.Component):
    """*width*: bits of the signed scores (32; 64 for SpAtten's 63-bit cumulative importance, docs/numerics.md)."""

    def __init__(self, max_n: int, width: int = 32):
        if max_n <= 0:
            raise AccllmError(f"top-k engine needs max_n > 0, got {max_n}")
        if not 2 <= width <= 64:
            raise AccllmError(f"top-k engine score width must lie in 2..64 bits, got {width}")
        self.max_n = max_n
        self.width = width
        super().__init__({"start": In(1), "n": In(range(max_n + 1)), "k": In(range(max_n + 1)),
                          "i": In(stream.Signature(signed(width))), "o": Out(stream.Signature(range(max_n))),
                          "busy": Out(1), "error": Out(1), "rounds": Out(16)})

    def elaborate(self, platform):
        m = Module()
        N = self.max_n
        m.submodules.scores = smem = memory.Memory(shape=signed(self.width), depth=N, init=[])
        m.submodules.flags = fmem = memory.Memory(shape=3, depth=N, init=[])
        sw, sr = smem.write_port(), smem.read_port(domain="comb")
        fw, fr = fmem.write_port(), fmem.read_port(domain="comb")
        n = Signal(range(N + 1))
        k = Signal(range(N + 1))
        need = Signal(range(N + 1))
        c = Signal(range(N + 1))          # candidates left
        b = Signal(range(N + 1))          # candidates that beat the pivot
        seen = Signal(range(N + 1))
        idx = Signal(range(N + 1))
        piv = Signal(range(N))
        pscore = Signal(signed(self.width))
        emitted = Signal(range(N + 1))
        mode = Signal(2)                  # UPDATE: 0 finish with better, 1 keep better, 2 take better + pivot
        m.d.comb += [sr.addr.eq(idx), fr.addr.eq(idx), fw.addr.eq(idx), sw.addr.eq(idx)]
        cand, picked, better = fr.data[CAND], fr.data[PICK], fr.data[BETTER]
        beats = Signal()
        m.d.comb += beats.eq((sr.data > pscore) | ((sr.data == pscore) & (idx < piv)))

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    with m.If((self.k > self.n) | (self.n > N) | (self.n == 0)):
                        m.d.sync += self.error.eq(1)
                    with m.Else():
                        m.d.sync += [n.eq(self.n), k.eq(self.k), need.eq(self.k), c.eq(self.n), idx.eq(0),
                                     self.error.eq(0), self.rounds.eq(0), emitted.eq(0)]
                        m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [self.busy.eq(1), self.i.ready.eq(1), sw.en.eq(self.i.valid), sw.data.eq(self.i.payload),
                             fw.en.eq(self.i.valid), fw.data.eq(Cat(k != n, k == n, 0))]
                with m.If(self.i.valid):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx + 1 == n):
                        m.d.sync += [idx.eq(0), seen.eq(0)]
                        with m.If((k == n) | (k == 0)):
                            m.next = "OUT"
                        with m.Else():
                            m.next = "PIVOT"
            with m.State("PIVOT"):
                m.d.comb += self.busy.eq(1)
                with m.If(cand):
                    with m.If(seen == (c >> 1)):
                        m.d.sync += [piv.eq(idx), pscore.eq(sr.data), idx.eq(0), b.eq(0),
                                     self.rounds.eq(self.rounds + 1)]
                        m.next = "EVAL"
                    with m.Else():
                        m.d.sync += [seen.eq(seen + 1), idx.eq(idx + 1)]
                with m.Else():
                    m.d.sync += idx.eq(idx + 1)
            with m.State("EVAL"):
                bt = cand & beats
                m.d.comb += [self.busy.eq(1), fw.en.eq(1), fw.data.eq(Cat(cand, picked, bt))]
                m.d.sync += [b.eq(b + bt), idx.eq(idx + 1)]
                with m.If(idx + 1 == n):
                    m.d.sync += idx.eq(0)
                    m.next = "DECIDE"
            with m.State("DECIDE"):
                m.d.comb += self.busy.eq(1)
                with m.If(b == need):
                    m.d.sync += mode.eq(0)
                with m.Elif(b > need):
                    m.d.sync += [mode.eq(1), c.eq(b)]
                with m.Else():
                    m.d.sync += [mode.eq(2), c.eq(c - b - 1), need.eq(need - b - 1)]
                m.next = "UPDATE"
            with m.State("UPDATE"):
                is_p = idx == piv
                m.d.comb += [self.busy.eq(1), fw.en.eq(1)]
                with m.Switch(mode):
                    with m.Case(0):
                        m.d.comb += fw.data.eq(Cat(0, picked | better, 0))
                    with m.Case(1):
                        m.d.comb += fw.data.eq(Cat(better, picked, 0))
                    with m.Default():
                        m.d.comb += fw.data.eq(Cat(cand & ~better & ~is_p, picked | better | is_p, 0))
                m.d.sync += idx.eq(idx + 1)
                with m.If(idx + 1 == n):
                    m.d.sync += [idx.eq(0), seen.eq(0)]
                    with m.If((mode == 0) | ((mode == 2) & (need == 0))):
                        m.next = "OUT"
                    with m.Else():
                        m.next = "PIVOT"
            with m.State("OUT"):
                m.d.comb += self.busy.eq(1)
                with m.If(emitted == k):
                    m.next = "IDLE"
                with m.Elif(picked):
                    m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(idx)]
                    with m.If(self.o.ready):
                        m.d.sync += [idx.eq(idx + 1), emitted.eq(emitted + 1)]
                with m.Else():
                    m.d.sync += idx.eq(idx + 1)
        return m
