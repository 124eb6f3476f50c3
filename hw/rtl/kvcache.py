"""KV-cache unit: 4-bit quantization on append, Λ ring-buffer addressing, dequantization
on read — bit-exactly hw/numerics.py and the slot rule of sim/emu.py / hw/memmap.py.

Pieces (each a ``wiring.Component``; :class:`KVCacheUnit` bundles them for the bench and the kernel):

* :class:`KeyQuant`   per element: q = clamp(round_half_up(k * RK * 2**-KS) + KZ, 0, 15), constants
                      per channel on the ``c`` stream (``RK | KS << 32 | KZ << 40``).
* :class:`ValueQuant` per group of ``vgroup`` values: the group is buffered, hi/lo/range, one
                      reciprocal Rv = (15 << 32) // r (sequential divider), zero point, codes, and the
                      dequantization word vm | vsh << 16 | z << 24 (second divider pass for vm).
* :class:`ValueDequant` per element: v = sat32(round_half_up((q - z) * vm * 2**-vsh)).
* :class:`KVAddr`     from the position register: the append slot and the kept slots in the order
                      sim/emu.py reads them (sinks 0..min(S, i+1)-1, then the window positions
                      max(S, i-W+1)..i in ascending position order), each flagged sink/window.
                      Ring rule (Λ): slot(j) = j for j < S, S + (j - S) mod W otherwise — sinks are
                      never evicted; the window wraps at S + W back to S. Linear cache (ring = 0):
                      slot = position, position >= slots -> STATUS_POSITION. A KV region that does not
                      fit (slots < 1, slots > max_context, S > 0 and slots != S + W) -> STATUS_KV_REGION.
                      Byte addresses: base + (head * slots + slot) * slot_bytes (hw/memmap.kv_layout).
"""
from __future__ import annotations

from amaranth import Cat, Module, Mux, Signal, signed
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from algo.common import AccllmError
from hw import numerics as nx
from hw import regmap

from .sfu import Divider, bitlen, clamp, i32_stream, row_buffer, rsr, shift_sat32


def kv_slot(position: int, sink: int, window: int, ring: bool = True) -> int:
    """Python statement of the slot rule (used by tests; sim/emu.py implements the same)."""
    if not ring or position < sink:
        return position
    return sink + (position - sink) % window


def kept_slots(position: int, sink: int, window: int, ring: bool = True) -> list[tuple[int, bool]]:
    """(slot, is_sink) of every token the query at *position* sees, in the order the unit emits."""
    if not ring:
        return [(j, False) for j in range(position + 1)]
    sinks = [(j, True) for j in range(min(sink, position + 1))]
    win = [(kv_slot(j, sink, window), False) for j in range(max(sink, position - window + 1), position + 1)]
    return sinks + win


class KeyQuant(wiring.Component):
    def __init__(self):
        super().__init__({"i": In(i32_stream()), "c": In(stream.Signature(48)), "o": Out(stream.Signature(4))})

    def elaborate(self, platform):
        m = Module()
        rk, ks, kz = self.c.payload[:32], self.c.payload[32:40], self.c.payload[40:44]
        ksc = Signal(6)
        m.d.comb += ksc.eq(Mux(ks > 63, 63, ks))
        q = Signal(signed(64))
        m.d.comb += q.eq(rsr(self.i.payload * rk, ksc) + kz)
        code = clamp(m, q, 0, nx.KV_QMAX, 4, "kq_code")
        take = self.i.valid & self.c.valid & (~self.o.valid | self.o.ready)
        m.d.comb += [self.i.ready.eq(take), self.c.ready.eq(take)]
        with m.If(take):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(code)]
        with m.Elif(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        return m


class ValueQuant(wiring.Component):
    """``start`` latches the group size; then groups of ``group`` values on ``i`` produce ``group``
    codes and one word on ``o`` (payload: code in bits 3:0, or the 32-bit word)."""

    def __init__(self, max_group: int = 256):
        self.max_group = max_group
        super().__init__({"group": In(range(max_group + 1)), "i": In(i32_stream()), "o": Out(stream.Signature(32))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.div = div = Divider(40, 24)
        m.submodules.rdiv = rdiv = Divider(36, 34)
        wp, (rp,) = row_buffer(m, "grp", self.max_group)
        g = Signal(range(self.max_group + 1))
        idx = Signal(range(self.max_group + 1))
        hi = Signal(signed(33))
        lo = Signal(signed(33))
        Rv = Signal(36)
        z = Signal(4)
        vm = Signal(16)
        vsh = Signal(signed(8))
        v = self.i.payload
        m.d.comb += [wp.addr.eq(idx), rp.addr.eq(idx), wp.data.eq(v)]
        r = Signal(34)
        m.d.comb += r.eq(Mux(hi - lo > 1, hi - lo, 1))
        blr = bitlen(m, r, 34, "vq_blr")
        vsh_c = Signal(signed(8))
        m.d.comb += vsh_c.eq(19 - blr)
        nsh = Signal(range(32))
        m.d.comb += nsh.eq(Mux(vsh < 0, -vsh, 0))
        zc = clamp(m, rsr(-lo * Rv, 32), 0, nx.KV_QMAX, 4, "vq_z")
        qc = clamp(m, rsr(rp.data * Rv, 32) + z, 0, nx.KV_QMAX, 4, "vq_q")
        with m.FSM():
            with m.State("LOAD"):
                m.d.comb += [self.i.ready.eq(1), wp.en.eq(self.i.valid)]
                with m.If(self.i.valid):
                    with m.If(idx == 0):
                        m.d.sync += [hi.eq(Mux(v > 0, v, 0)), lo.eq(Mux(v < 0, v, 0)), g.eq(self.group)]
                    with m.Else():
                        with m.If(v > hi):
                            m.d.sync += hi.eq(v)
                        with m.If(v < lo):
                            m.d.sync += lo.eq(v)
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(((idx == 0) & (self.group == 1)) | ((idx != 0) & (idx + 1 == g))):
                        m.next = "DIV0"
            with m.State("DIV0"):
                m.d.comb += [rdiv.start.eq(1), rdiv.num.eq(nx.KV_QMAX << 32), rdiv.den.eq(r)]
                m.d.sync += vsh.eq(vsh_c)
                m.next = "DIV"
            with m.State("DIV"):
                with m.If(~rdiv.busy):
                    m.d.sync += Rv.eq(rdiv.quo)
                    m.next = "VM0"
            with m.State("VM0"):
                m.d.comb += div.start.eq(1)
                with m.If(vsh >= 0):
                    m.d.comb += [div.num.eq(((r << vsh[:5]) << 1) + 15), div.den.eq(30)]
                with m.Else():
                    m.d.comb += [div.num.eq((r << 1) + (15 << nsh)), div.den.eq(30 << nsh)]
                m.d.sync += [z.eq(zc), idx.eq(0)]
                m.next = "VM"
            with m.State("VM"):
                with m.If(~div.busy):
                    m.d.sync += vm.eq(div.quo)
                    m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(qc)]
                with m.If(self.o.ready):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx + 1 == g):
                        m.next = "WORD"
            with m.State("WORD"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(Cat(vm, vsh, z))]
                with m.If(self.o.ready):
                    m.d.sync += idx.eq(0)
                    m.next = "LOAD"
        return m


def value_dequant(m: Module, code, word, name: str):
    vm, vsh, z = word[:16], word[16:24].as_signed(), word[24:28]
    d = Signal(signed(6), name=f"{name}_d")
    m.d.comb += d.eq(code - z)
    return shift_sat32(m, d * vm, vsh, name)


class ValueDequant(wiring.Component):
    """Element-wise: payload code (bits 3:0) | word << 4 -> X32 value."""

    def __init__(self):
        super().__init__({"i": In(stream.Signature(36)), "o": Out(i32_stream())})

    def elaborate(self, platform):
        m = Module()
        y = value_dequant(m, self.i.payload[:4], self.i.payload[4:36], "vdq")
        take = self.i.valid & (~self.o.valid | self.o.ready)
        m.d.comb += self.i.ready.eq(take)
        with m.If(take):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(y)]
        with m.Elif(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        return m


SLOT = 16


class KVAddr(wiring.Component):
    """``start`` with pos / sink / window / slots / ring -> ``status`` (0, STATUS_POSITION or
    STATUS_KV_REGION), ``append`` (the slot of pos) and, if status is 0, the kept slots on ``o``
    (payload: slot | is_sink << 16)."""

    def __init__(self, max_context: int):
        self.max_context = max_context
        super().__init__({"start": In(1), "pos": In(32), "sink": In(SLOT), "window": In(SLOT), "slots": In(SLOT),
                          "ring": In(1), "status": Out(8), "append": Out(SLOT), "busy": Out(1),
                          "o": Out(stream.Signature(SLOT + 1))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.div = div = Divider(32, SLOT)
        pos = Signal(32)
        S, W, slots = Signal(SLOT), Signal(SLOT), Signal(SLOT)
        ring = Signal()
        j = Signal(33)             # position being emitted
        slot = Signal(SLOT)
        wstart = Signal(33)
        cnt = Signal(33)
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [pos.eq(self.pos), S.eq(self.sink), W.eq(self.window), slots.eq(self.slots),
                                 ring.eq(self.ring), self.status.eq(0)]
                    bad_region = ((self.slots == 0) | (self.slots > self.max_context) |
                                  ((self.sink > 0) & (self.slots != self.sink + self.window)) |
                                  (self.ring & (self.window == 0)))
                    with m.If(bad_region):
                        m.d.sync += self.status.eq(regmap.STATUS_KV_REGION)
                    with m.Elif(~self.ring & (self.pos >= self.slots)):
                        m.d.sync += self.status.eq(regmap.STATUS_POSITION)
                    with m.Elif(~self.ring | (self.pos < self.sink)):
                        m.d.sync += [self.append.eq(self.pos), j.eq(0)]
                        m.next = "SINKS"
                    with m.Else():
                        m.d.comb += [div.start.eq(1), div.num.eq(self.pos - self.sink), div.den.eq(self.window)]
                        m.next = "MOD"
            with m.State("MOD"):
                m.d.comb += self.busy.eq(1)
                with m.If(~div.busy):
                    m.d.sync += [self.append.eq(S + div.rem), j.eq(0)]
                    m.next = "SINKS"
            with m.State("SINKS"):
                # linear cache: every position 0..pos as a "window" entry; ring: sinks 0..min(S, pos+1)-1
                m.d.comb += self.busy.eq(1)
                nsink = Mux(ring, Mux(pos + 1 < S, pos + 1, S), 0)
                with m.If(j < nsink):
                    m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(Cat(j[:SLOT], 1))]
                    with m.If(self.o.ready):
                        m.d.sync += j.eq(j + 1)
                with m.Else():
                    ws = Mux(ring, Mux(pos + 1 > S + W, pos + 1 - W, S), 0)
                    m.d.sync += [wstart.eq(ws), j.eq(ws), cnt.eq(Mux(pos + 1 > ws, pos + 1 - ws, 0))]
                    # the slot of the first window position: append slot - (count - 1), wrapped into [S, S+W)
                    first = Signal(33)
                    m.d.comb += first.eq(self.append + S + W - (pos - ws) - S)
                    with m.If(~ring):
                        m.d.sync += slot.eq(0)
                    with m.Elif(self.append - S >= pos - ws):
                        m.d.sync += slot.eq(self.append - (pos - ws))
                    with m.Else():
                        m.d.sync += slot.eq(first)
                    m.next = "WINDOW"
            with m.State("WINDOW"):
                m.d.comb += self.busy.eq(1)
                with m.If(cnt == 0):
                    m.next = "IDLE"
                with m.Else():
                    m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(Cat(slot, 0))]
                    with m.If(self.o.ready):
                        m.d.sync += [cnt.eq(cnt - 1), j.eq(j + 1),
                                     slot.eq(Mux(ring & (slot + 1 == S + W), S, slot + 1))]
        return m


class KVCacheUnit(wiring.Component):
    """The four pieces side by side (prefixed ports: kq_*, vq_*, vd_*, addr_*)."""

    def __init__(self, max_context: int, max_group: int = 256):
        self.max_context, self.max_group = max_context, max_group
        if max_context <= 0 or max_context >= (1 << SLOT):
            raise AccllmError(f"KV-cache unit: max_context must be in 1..{(1 << SLOT) - 1}, got {max_context}")
        super().__init__({
            "kq_i": In(i32_stream()), "kq_c": In(stream.Signature(48)), "kq_o": Out(stream.Signature(4)),
            "vq_group": In(range(max_group + 1)), "vq_i": In(i32_stream()), "vq_o": Out(stream.Signature(32)),
            "vd_i": In(stream.Signature(36)), "vd_o": Out(i32_stream()),
            "start": In(1), "pos": In(32), "sink": In(SLOT), "window": In(SLOT), "slots": In(SLOT), "ring": In(1),
            "status": Out(8), "append": Out(SLOT), "busy": Out(1), "addr_o": Out(stream.Signature(SLOT + 1)),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.kq = kq = KeyQuant()
        m.submodules.vq = vq = ValueQuant(self.max_group)
        m.submodules.vd = vd = ValueDequant()
        m.submodules.addr = ad = KVAddr(self.max_context)
        wiring.connect(m, wiring.flipped(self.kq_i), kq.i)
        wiring.connect(m, wiring.flipped(self.kq_c), kq.c)
        wiring.connect(m, kq.o, wiring.flipped(self.kq_o))
        wiring.connect(m, wiring.flipped(self.vq_i), vq.i)
        wiring.connect(m, vq.o, wiring.flipped(self.vq_o))
        wiring.connect(m, wiring.flipped(self.vd_i), vd.i)
        wiring.connect(m, vd.o, wiring.flipped(self.vd_o))
        wiring.connect(m, ad.o, wiring.flipped(self.addr_o))
        m.d.comb += [vq.group.eq(self.vq_group), ad.start.eq(self.start), ad.pos.eq(self.pos), ad.sink.eq(self.sink),
                     ad.window.eq(self.window), ad.slots.eq(self.slots), ad.ring.eq(self.ring),
                     self.status.eq(ad.status), self.append.eq(ad.append), self.busy.eq(ad.busy)]
        return m
