"""Attention flow: one query head over the tokens the KV cache keeps — scores Q·K from
4-bit keys, softmax, probabilities × dequantized 4-bit values — bit-exactly the ATTN arithmetic of
hw/numerics.py / sim/emu.py:

  qf_c = round_half_up(q_c * KM_c / 2**16)                  (q after RoPE; per channel KM, KZ)
  s_j  = shift_sat32(sum_c qf_c * (k_jc - KZ_c), KSH - 16)  (sink rows use the query rotated at
                                                             S + W - 1 when rope_mode = cache remaps)
  p    = softmax_q24(s)                                     (hw.rtl.sfu.Softmax, the one reciprocal)
  o_c  = sat32(round_half_up(sum_j p_j * vhat_jc / 2**24))  vhat = numerics.value_dequant

Streams: ``q`` (hd values, then hd more when ``remap``), ``c`` (per channel ``KM | KZ << 16``, once
per loaded query), ``k`` (n x hd key codes, token-major, the order hw.rtl.kvcache.KVAddr emits,
``lanes`` codes per item, channel c + i in bits 4i..4i+3), ``v`` (n x hd elements code | word << 4,
``lanes`` per item, 36 bits each), ``o`` (hd outputs, one per item). The first ``ns`` tokens use the second query.
``pt_*`` show every probability once, with its token index, as the softmax produces it (SpAtten's
token importance, hw/rtl/attn_unit.py).
Integer sums are exact (|s| < 2**43 before the shift; the P×V accumulator is 64-bit).
"""
from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from algo.common import AccllmError

from .kvcache import value_dequant
from .sfu import Softmax, i32_stream, rsr_c, sat, shift_sat32


class AttentionCore(wiring.Component):
    """``lanes`` channels per cycle in both passes (scores: ``lanes`` products q·(k − KZ) summed into
    the slot's accumulator; P x V: ``lanes`` accumulators updated per cycle), so a kept slot costs
    hd / lanes cycles per pass. The query and the outputs move one channel per cycle. ``hd`` must be
    a multiple of ``lanes`` (the kernel's ATTN unit requires multiples of 8)."""

    def __init__(self, max_hd: int = 256, max_n: int = 2048, lanes: int = 8):
        if max_hd <= 0 or max_n <= 0:
            raise AccllmError(f"attention core needs max_hd, max_n > 0, got {max_hd}, {max_n}")
        if lanes not in (1, 2, 4, 8, 16) or max_hd % lanes:
            raise AccllmError(f"attention core lanes={lanes}: accepted 1, 2, 4, 8, 16 dividing max_hd={max_hd}")
        self.max_hd, self.max_n, self.lanes = max_hd, max_n, lanes
        super().__init__({"start": In(1), "n": In(range(max_n + 1)), "ns": In(range(max_n + 1)), "remap": In(1),
                          "hd": In(range(max_hd + 1)), "ksh": In(signed(8)),
                          "q": In(i32_stream()), "c": In(stream.Signature(20)), "k": In(stream.Signature(4 * lanes)),
                          "v": In(stream.Signature(36 * lanes)), "o": Out(i32_stream()), "busy": Out(1),
                          # SpAtten tap: each probability as softmax emits it (Q8.24, index into the k stream)
                          "pt_valid": Out(1), "pt_idx": Out(range(max_n + 1)), "pt_val": Out(32)})

    def elaborate(self, platform):
        m = Module()
        HD, N, L = self.max_hd, self.max_n, self.lanes
        lgL = L.bit_length() - 1
        m.submodules.sm = sm = Softmax(N)

        def mem(name, e, depth, lanes):
            # one row holds `lanes` elements of e bits; written one element at a time (granularity e)
            mm = memory.Memory(shape=e * lanes, depth=depth, init=[])
            m.submodules[name] = mm
            return mm.write_port(granularity=e) if lanes > 1 else mm.write_port(), mm.read_port(domain="comb")

        rows = HD // L
        qf_w, qf_r = mem("qf", 48, rows, L)
        q2_w, q2_r = mem("qf2", 48, rows, L)
        kz_w, kz_r = mem("kz", 4, rows, L)
        p_w, p_r = mem("p", 32, N, 1)
        a_w, a_r = mem("acc", 64 * L, rows, 1)

        n, ns, hd = Signal(range(N + 1)), Signal(range(N + 1)), Signal(range(HD + 1))
        remap = Signal()
        ksh = Signal(signed(8))
        c = Signal(range(HD + L))          # channel; steps by L in the two passes
        j = Signal(range(N + 1))
        acc = Signal(signed(64))
        row = c[lgL:] if lgL else c
        lane = c[:lgL] if lgL else Const(0, 1)
        for w_, r_ in ((qf_w, qf_r), (q2_w, q2_r), (kz_w, kz_r), (a_w, a_r)):
            m.d.comb += [w_.addr.eq(row), r_.addr.eq(row)]
        m.d.comb += [p_w.addr.eq(j), p_r.addr.eq(j)]
        km, kzc = self.c.payload[:16], self.c.payload[16:20]
        qf_c = Signal(signed(48))
        m.d.comb += qf_c.eq(rsr_c(self.q.payload * km, 16))
        m.d.comb += [qf_w.data.eq(qf_c.replicate(L)), q2_w.data.eq(qf_c.replicate(L)), kz_w.data.eq(kzc.replicate(L))]
        one_lane = Signal(L)
        m.d.comb += one_lane.eq(Const(1, L) << lane)
        # scores: L channels of slot j per cycle
        use2 = Signal()
        m.d.comb += use2.eq(remap & (j < ns))
        prods = []
        for ln in range(L):
            d = Signal(signed(6), name=f"d{ln}")
            m.d.comb += d.eq(self.k.payload[4 * ln: 4 * ln + 4] - kz_r.data[4 * ln: 4 * ln + 4])
            qsel = Signal(signed(48), name=f"qsel{ln}")
            m.d.comb += qsel.eq(Mux(use2, q2_r.data[48 * ln: 48 * ln + 48], qf_r.data[48 * ln: 48 * ln + 48]))
            prods.append(qsel * d)
        total = Signal(signed(64))
        m.d.comb += total.eq(acc + sum(prods[1:], prods[0]))
        score = shift_sat32(m, total, ksh - 16, "att_s")
        m.d.comb += sm.n.eq(n)
        # P x V: L accumulators per cycle
        upd = []
        for ln in range(L):
            pv = self.v.payload[36 * ln: 36 * ln + 36]
            vh = value_dequant(m, pv[:4], pv[4:36], f"att_vh{ln}")
            old = a_r.data[64 * ln: 64 * ln + 64].as_signed()
            upd.append((Mux(j == 0, 0, old) + p_r.data * vh)[:64])
        m.d.comb += a_w.data.eq(Cat(*upd))
        outv = sat(m, rsr_c(a_r.data.word_select(lane, 64).as_signed(), 24), 32, "att_o")

        def last_c():
            return c + 1 == hd

        def last_chunk():
            return c + L == hd

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [n.eq(self.n), ns.eq(self.ns), hd.eq(self.hd), remap.eq(self.remap),
                                 ksh.eq(self.ksh), c.eq(0), j.eq(0)]
                    m.next = "LOADQ"
            with m.State("LOADQ"):
                take = self.q.valid & self.c.valid
                m.d.comb += [self.busy.eq(1), self.q.ready.eq(take), self.c.ready.eq(take),
                             qf_w.en.eq(Mux(take, one_lane, 0)), kz_w.en.eq(Mux(take, one_lane, 0))]
                with m.If(take):
                    m.d.sync += c.eq(c + 1)
                    with m.If(last_c()):
                        m.d.sync += c.eq(0)
                        m.next = "LOADQ2_OR_SC"
            with m.State("LOADQ2_OR_SC"):
                m.d.comb += self.busy.eq(1)
                with m.If(remap):
                    m.next = "LOADQ2"
                with m.Else():
                    m.next = "SC0"
            with m.State("LOADQ2"):
                take = self.q.valid & self.c.valid
                m.d.comb += [self.busy.eq(1), self.q.ready.eq(take), self.c.ready.eq(take),
                             q2_w.en.eq(Mux(take, one_lane, 0))]
                with m.If(take):
                    m.d.sync += c.eq(c + 1)
                    with m.If(last_c()):
                        m.d.sync += c.eq(0)
                        m.next = "SC0"
            with m.State("SC0"):
                m.d.comb += [self.busy.eq(1), sm.start.eq(1)]
                m.d.sync += [acc.eq(0), c.eq(0), j.eq(0)]
                m.next = "SCORES"
            with m.State("SCORES"):
                m.d.comb += [self.busy.eq(1), self.k.ready.eq(1)]
                with m.If(self.k.valid):
                    with m.If(last_chunk()):
                        m.d.comb += [sm.i.valid.eq(1), sm.i.payload.eq(score)]
                        m.d.sync += [acc.eq(0), c.eq(0), j.eq(j + 1)]
                        with m.If(j + 1 == n):
                            m.d.sync += j.eq(0)
                            m.next = "PCOL"
                    with m.Else():
                        m.d.sync += [acc.eq(total), c.eq(c + L)]
            with m.State("PCOL"):
                m.d.comb += [self.busy.eq(1), sm.o.ready.eq(1), p_w.en.eq(sm.o.valid), p_w.data.eq(sm.o.payload),
                             self.pt_valid.eq(sm.o.valid), self.pt_idx.eq(j), self.pt_val.eq(sm.o.payload)]
                with m.If(sm.o.valid):
                    m.d.sync += j.eq(j + 1)
                    with m.If(j + 1 == n):
                        m.d.sync += j.eq(0)
                        m.next = "PV"
            with m.State("PV"):
                m.d.comb += [self.busy.eq(1), self.v.ready.eq(1), a_w.en.eq(self.v.valid)]
                with m.If(self.v.valid):
                    with m.If(last_chunk()):
                        m.d.sync += [c.eq(0), j.eq(j + 1)]
                        with m.If(j + 1 == n):
                            m.next = "OUT"
                    with m.Else():
                        m.d.sync += c.eq(c + L)
            with m.State("OUT"):
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(1), self.o.payload.eq(outv)]
                with m.If(self.o.ready):
                    m.d.sync += c.eq(c + 1)
                    with m.If(last_c()):
                        m.next = "IDLE"
        return m
