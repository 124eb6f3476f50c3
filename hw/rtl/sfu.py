"""Special-function unit: RMSNorm, per-token int8 quantization, SiLU x up, RoPE, softmax,
residual add and argmax — bit-exactly the functions of hw/numerics.py.

Every operation is a small ``wiring.Component`` with ``stream`` inputs/outputs of int32 payloads
(one element per cycle where the operation is a pure map, row-buffered where it needs a reduction
first) and a ``start`` pulse that latches the row length and parameters. :class:`SFU` muxes them
behind one command interface (``op``), which is what the kernel dispatch and the cocotb bench use.

Shared arithmetic building blocks (also used by hw/rtl/kvcache.py and hw/rtl/attention.py):
  :class:`Divider`   unsigned restoring divider, one quotient bit per cycle (the "one reciprocal")
  :class:`ISqrt`     floor(sqrt(v)) bit by bit, one result bit per cycle
  ``rsr`` / ``rsr_c`` round-half-up arithmetic right shift (variable / constant amount)
  ``sat`` / ``bitlen`` / ``shift_sat32``  as in hw/numerics.py

Row buffers use asynchronous-read memories (one element per cycle, no read pipeline); they map to
LUTRAM/registers in synthesis (noted in docs/rtl.md).
"""
from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from algo.common import AccllmError
from hw import numerics as nx

I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


# --------------------------------------------------------------------------------------------------
# arithmetic helpers (combinational)
# --------------------------------------------------------------------------------------------------
def rsr(x, s):
    """numerics.rshift_round with a variable unsigned shift *s*: (x + ((1 << s) >> 1)) >> s."""
    half = (Const(1, 1) << s) >> 1
    return (x + half) >> s


def rsr_c(x, s: int):
    """numerics.rshift_round with a constant shift."""
    if s <= 0:
        return x
    return (x + (1 << (s - 1))) >> s


def sat(m: Module, x, bits: int, name: str) -> Signal:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    out = Signal(signed(bits), name=name)
    m.d.comb += out.eq(Mux(x > hi, hi, Mux(x < lo, lo, x)))
    return out


def clamp(m: Module, x, lo: int, hi: int, shape, name: str) -> Signal:
    out = Signal(shape, name=name)
    m.d.comb += out.eq(Mux(x > hi, hi, Mux(x < lo, lo, x)))
    return out


def bitlen(m: Module, x, width: int, name: str) -> Signal:
    """Number of bits of the non-negative value x (0 -> 0)."""
    out = Signal(range(width + 1), name=name)
    for i in range(width):
        with m.If(x[i]):
            m.d.comb += out.eq(i + 1)
    return out


def shift_sat32(m: Module, y, r, name: str) -> Signal:
    """numerics.shift_sat32 of one value: y * 2**-r (round half up) for r > 0, sat32(y) << -r else."""
    rs = Signal(range(63), name=f"{name}_rs")
    ls = Signal(range(32), name=f"{name}_ls")
    m.d.comb += [rs.eq(Mux(r > 62, 62, Mux(r > 0, r, 0))), ls.eq(Mux(r < -31, 31, Mux(r < 0, -r, 0)))]
    right = Signal(signed(len(y) + 2), name=f"{name}_right")
    m.d.comb += right.eq(rsr(y, rs))
    yc = sat(m, y, 32, f"{name}_yc")
    left = Signal(signed(64), name=f"{name}_left")
    m.d.comb += left.eq(yc << ls)
    return sat(m, Mux(r > 0, right, left), 32, name)


def rom(m: Module, name: str, values, shape, ports: int = 2):
    """A ROM with *ports* asynchronous read ports (returns the list of read ports)."""
    mem = memory.Memory(shape=shape, depth=len(values), init=[int(v) for v in values])
    m.submodules[name] = mem
    return [mem.read_port(domain="comb") for _ in range(ports)]


def row_buffer(m: Module, name: str, depth: int, shape=signed(32), reads: int = 1):
    mem = memory.Memory(shape=shape, depth=depth, init=[])
    m.submodules[name] = mem
    return mem.write_port(), [mem.read_port(domain="comb") for _ in range(reads)]


def row_buffer_sync(m: Module, name: str, depth: int, index, shape=signed(32)):
    """A row buffer read synchronously (block RAM; an asynchronous read puts the whole buffer in LUTs)
    at the element *index* will have in the next cycle: *index* is a register whose next value the
    caller drives as a comb signal (returned, default: unchanged), so ``rp.data`` is always
    ``buf[index]`` in the cycle ``index`` has that value, as with an asynchronous read.
    The write port writes at ``index`` (the caller drives its data and enable)."""
    mem = memory.Memory(shape=shape, depth=depth, init=[])
    m.submodules[name] = mem
    nxt = Signal.like(index, name=f"{name}_next")
    m.d.comb += nxt.eq(index)
    m.d.sync += index.eq(nxt)
    wp, rp = mem.write_port(), mem.read_port()
    m.d.comb += [wp.addr.eq(index), rp.addr.eq(nxt)]
    return wp, rp, nxt


def i32_stream():
    return stream.Signature(signed(32))


# --------------------------------------------------------------------------------------------------
# sequential divider and square root
# --------------------------------------------------------------------------------------------------
class Divider(wiring.Component):
    """quo = num // den (unsigned), one bit per cycle: ``start`` latches num/den, ``busy`` is high for
    ``num_w`` cycles, then ``quo`` holds the result. den == 0 gives all ones (callers never pass 0)."""

    def __init__(self, num_w: int, den_w: int):
        self.num_w, self.den_w = num_w, den_w
        super().__init__({"start": In(1), "num": In(num_w), "den": In(den_w), "busy": Out(1), "quo": Out(num_w),
                          "rem": Out(den_w + 1)})

    def elaborate(self, platform):
        m = Module()
        rem = self.rem
        den = Signal(self.den_w)
        cnt = Signal(range(self.num_w + 1))
        t = Signal(self.den_w + 2)
        m.d.comb += t.eq(Cat(self.quo[-1], rem))
        with m.If(self.start):
            m.d.sync += [rem.eq(0), self.quo.eq(self.num), den.eq(self.den), cnt.eq(self.num_w), self.busy.eq(1)]
        with m.Elif(self.busy):
            with m.If(t >= den):
                m.d.sync += [rem.eq(t - den), self.quo.eq(Cat(1, self.quo[:-1]))]
            with m.Else():
                m.d.sync += [rem.eq(t), self.quo.eq(Cat(0, self.quo[:-1]))]
            m.d.sync += cnt.eq(cnt - 1)
            with m.If(cnt == 1):
                m.d.sync += self.busy.eq(0)
        return m


class ISqrt(wiring.Component):
    """root = floor(sqrt(v)) for v < 2**(2*res_w), one result bit per cycle (``res_w`` cycles busy)."""

    def __init__(self, res_w: int = 31):
        self.res_w = res_w
        super().__init__({"start": In(1), "v": In(2 * res_w), "busy": Out(1), "root": Out(res_w)})

    def elaborate(self, platform):
        m = Module()
        v = Signal(2 * self.res_w)
        bit = Signal(range(self.res_w))
        trial = Signal(self.res_w)
        m.d.comb += trial.eq(self.root | (Const(1, self.res_w) << bit))
        with m.If(self.start):
            m.d.sync += [v.eq(self.v), self.root.eq(0), bit.eq(self.res_w - 1), self.busy.eq(1)]
        with m.Elif(self.busy):
            with m.If(trial * trial <= v):
                m.d.sync += self.root.eq(trial)
            m.d.sync += bit.eq(bit - 1)
            with m.If(bit == 0):
                m.d.sync += self.busy.eq(0)
        return m


# --------------------------------------------------------------------------------------------------
# per-token int8 quantization (numerics.act_quant)
# --------------------------------------------------------------------------------------------------
class ActQuant(wiring.Component):
    """X32 row of ``n`` values on ``i`` -> ``n`` int8 codes on ``o`` (sign-extended), then the token
    scale word ``ma | ea << 16`` as element n+1."""

    def __init__(self, max_d: int):
        self.max_d = max_d
        super().__init__({"start": In(1), "n": In(range(max_d + 1)), "i": In(i32_stream()), "o": Out(i32_stream()),
                          "busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.div = div = Divider(39, 33)
        n = Signal(range(self.max_d + 1))
        idx = Signal(range(self.max_d + 1))
        wp, rp, idx_n = row_buffer_sync(m, "buf", self.max_d, idx)
        amax = Signal(33)
        ea = Signal(range(18))
        ma = Signal(17)
        R = Signal(39)
        v = self.i.payload
        absv = Signal(33)
        m.d.comb += absv.eq(Mux(v < 0, -v, v))
        bl = bitlen(m, amax, 33, "aq_bl")
        ea_c = Signal(range(18))
        m.d.comb += ea_c.eq(Mux(bl > nx.MA_BITS, bl - nx.MA_BITS, 0))
        ma_c = Signal(17)
        m.d.comb += ma_c.eq(((amax - 1) >> ea_c) + 1)
        m.d.comb += wp.data.eq(v)
        prod = Signal(signed(72))
        m.d.comb += prod.eq((rp.data * R + (1 << 31)) >> 32)
        code = clamp(m, prod, -nx.ACT_QMAX, nx.ACT_QMAX, signed(32), "aq_code")
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [n.eq(self.n), amax.eq(1)]
                    m.d.comb += idx_n.eq(0)
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [self.busy.eq(1), self.i.ready.eq(1), wp.en.eq(self.i.valid)]
                with m.If(self.i.valid):
                    m.d.comb += idx_n.eq(idx + 1)
                    with m.If(absv > amax):
                        m.d.sync += amax.eq(absv)
                    with m.If(idx + 1 == n):
                        m.next = "DIV0"
            with m.State("DIV0"):
                m.d.comb += [self.busy.eq(1), div.start.eq(1), div.num.eq(nx.ACT_QMAX << 32),
                             div.den.eq(ma_c << ea_c)]
                m.d.sync += [ea.eq(ea_c), ma.eq(ma_c)]
                m.d.comb += idx_n.eq(0)
                m.next = "DIV"
            with m.State("DIV"):
                m.d.comb += self.busy.eq(1)
                with m.If(~div.busy):
                    m.d.sync += R.eq(div.quo)
                    m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(1), self.o.payload.eq(code)]
                with m.If(self.o.ready):
                    m.d.comb += idx_n.eq(idx + 1)
                    with m.If(idx + 1 == n):
                        m.next = "WORD"
            with m.State("WORD"):
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(1), self.o.payload.eq(Cat(ma[:16], ea[:16]))]
                with m.If(self.o.ready):
                    m.next = "IDLE"
        return m


# --------------------------------------------------------------------------------------------------
# RMSNorm (numerics.rmsnorm): X32 row on i, gamma on g -> X32 row on o
# --------------------------------------------------------------------------------------------------
class RMSNorm(wiring.Component):
    def __init__(self, max_d: int):
        self.max_d = max_d
        super().__init__({"start": In(1), "n": In(range(max_d + 1)), "e40": In(64),
                          "i": In(i32_stream()), "g": In(i32_stream()), "o": Out(i32_stream()), "busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.div = div = Divider(64, 32)
        m.submodules.sqrt = sq = ISqrt(31)
        n = Signal(range(self.max_d + 1))
        e40 = Signal(64)
        idx = Signal(range(self.max_d + 1))
        wp, rp, idx_n = row_buffer_sync(m, "buf", self.max_d, idx)
        amax = Signal(33)
        ns = Signal(range(14))
        ss = Signal(64)
        w = Signal(64)
        h = Signal(range(32))
        rinv = Signal(33)
        v = self.i.payload
        absv = Signal(33)
        m.d.comb += absv.eq(Mux(v < 0, -v, v))
        m.d.comb += wp.data.eq(v)
        bl = bitlen(m, amax, 33, "rn_bl")
        ns_c = Signal(range(14))
        m.d.comb += ns_c.eq(Mux(bl > 20, bl - 20, 0))
        xs = Signal(signed(32))
        m.d.comb += xs.eq(rp.data >> ns)
        # mean square + eps, normalised for the square root
        eps_w = Signal(64)
        m.d.comb += eps_w.eq(rsr(e40, ns << 1))
        vsum = Signal(65)
        m.d.comb += vsum.eq(w + eps_w)
        vv = Signal(65)
        m.d.comb += vv.eq(Mux(vsum == 0, 1, vsum))
        blv = bitlen(m, vv, 65, "rn_blv")
        h_c = Signal(range(32))
        m.d.comb += h_c.eq(Mux(blv >= 62, 0, (62 - blv) >> 1))
        # output path
        xr = Signal(signed(72))
        m.d.comb += xr.eq(rp.data * rinv)
        xh = sat(m, rsr(xr, (41 + ns - h)[:6]), 32, "rn_xh")
        y = sat(m, rsr_c(xh * self.g.payload, 16), 32, "rn_y")
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [n.eq(self.n), e40.eq(self.e40), amax.eq(0), ss.eq(0)]
                    m.d.comb += idx_n.eq(0)
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [self.busy.eq(1), self.i.ready.eq(1), wp.en.eq(self.i.valid)]
                with m.If(self.i.valid):
                    m.d.comb += idx_n.eq(idx + 1)
                    with m.If(absv > amax):
                        m.d.sync += amax.eq(absv)
                    with m.If(idx + 1 == n):
                        m.next = "NS"
            with m.State("NS"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += ns.eq(ns_c)
                m.d.comb += idx_n.eq(0)
                m.next = "SUMSQ"
            with m.State("SUMSQ"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += ss.eq(ss + xs * xs)
                m.d.comb += idx_n.eq(idx + 1)
                with m.If(idx + 1 == n):
                    m.next = "DIVW0"
            with m.State("DIVW0"):
                m.d.comb += [self.busy.eq(1), div.start.eq(1), div.num.eq(ss << 8), div.den.eq(n)]
                m.next = "DIVW"
            with m.State("DIVW"):
                m.d.comb += self.busy.eq(1)
                with m.If(~div.busy):
                    m.d.sync += w.eq(div.quo)
                    m.next = "SQRT0"
            with m.State("SQRT0"):
                m.d.comb += [self.busy.eq(1), sq.start.eq(1), sq.v.eq(vv << (h_c << 1))]
                m.d.sync += h.eq(h_c)
                m.next = "SQRT"
            with m.State("SQRT"):
                m.d.comb += self.busy.eq(1)
                with m.If(~sq.busy):
                    m.next = "DIVR0"
            with m.State("DIVR0"):
                m.d.comb += [self.busy.eq(1), div.start.eq(1), div.num.eq(1 << 61), div.den.eq(sq.root)]
                m.next = "DIVR"
            with m.State("DIVR"):
                m.d.comb += self.busy.eq(1)
                with m.If(~div.busy):
                    m.d.sync += rinv.eq(div.quo)
                    m.d.comb += idx_n.eq(0)
                    m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(self.g.valid), self.g.ready.eq(self.o.ready),
                             self.o.payload.eq(y)]
                with m.If(self.o.ready & self.g.valid):
                    m.d.comb += idx_n.eq(idx + 1)
                    with m.If(idx + 1 == n):
                        m.next = "IDLE"
        return m


# --------------------------------------------------------------------------------------------------
# element-wise ops: SiLU(gate) * up, saturating add (numerics.silu_mul / add_sat)
# --------------------------------------------------------------------------------------------------
def sigmoid_q30(m: Module, g, name: str):
    lo_p, hi_p = rom(m, f"{name}_rom", nx.SIGMOID_LUT, signed(32), 2)
    xc = Signal(22, name=f"{name}_xc")
    m.d.comb += xc.eq(Mux(g < -(16 << 16), -(16 << 16), Mux(g > (16 << 16) - 1, (16 << 16) - 1, g)) + (16 << 16))
    m.d.comb += [lo_p.addr.eq(xc[11:]), hi_p.addr.eq(xc[11:] + 1)]
    out = Signal(signed(33), name=name)
    m.d.comb += out.eq(lo_p.data + rsr_c((hi_p.data - lo_p.data) * xc[:11], 11))
    return out


class EltWise(wiring.Component):
    """Joins ``a`` and ``b`` element by element; op 0: sat32(a + b), op 1: SiLU(a) * b. Registered
    output, one element per cycle."""

    def __init__(self):
        super().__init__({"op": In(1), "a": In(i32_stream()), "b": In(i32_stream()), "o": Out(i32_stream())})

    def elaborate(self, platform):
        m = Module()
        a, b = self.a.payload, self.b.payload
        sig = sigmoid_q30(m, a, "sig")
        s = Signal(signed(34))
        m.d.comb += s.eq(rsr_c(a * sig, 30))
        silu = sat(m, rsr_c(s * b, 16), 32, "silu_y")
        add = sat(m, a + b, 32, "add_y")
        take = Signal()
        m.d.comb += take.eq(self.a.valid & self.b.valid & (~self.o.valid | self.o.ready))
        m.d.comb += [self.a.ready.eq(take), self.b.ready.eq(take)]
        with m.If(take):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(Mux(self.op, silu, add))]
        with m.Elif(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        return m


# --------------------------------------------------------------------------------------------------
# RoPE (numerics.rope_cos_sin + rope): x [n] on i, frequency words F [n/2] on f -> y [n] on o
# --------------------------------------------------------------------------------------------------
def sin_phase(m: Module, ph, p_lo, p_hi, name: str):
    m.d.comb += [p_lo.addr.eq(ph[20:32]), p_hi.addr.eq(ph[20:32] + 1)]
    out = Signal(signed(33), name=name)
    m.d.comb += out.eq(p_lo.data + rsr_c((p_hi.data - p_lo.data) * ph[:20], 20))
    return out


class RoPE(wiring.Component):
    def __init__(self, max_hd: int = 256):
        self.max_hd = max_hd
        super().__init__({"start": In(1), "n": In(range(max_hd + 1)), "pos": In(32),
                          "i": In(i32_stream()), "f": In(stream.Signature(32)), "o": Out(i32_stream()),
                          "busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        wp, (r1, r2) = row_buffer(m, "buf", self.max_hd, reads=2)
        ports = rom(m, "sin_rom", nx.SIN_LUT, signed(32), 4)
        n = Signal(range(self.max_hd + 1))
        half = Signal(range(self.max_hd + 1))
        pos = Signal(32)
        idx = Signal(range(self.max_hd + 1))
        ph = Signal(32)
        m.d.comb += ph.eq(pos * self.f.payload)
        phc = Signal(32)
        m.d.comb += phc.eq(ph + (1 << 30))
        S = sin_phase(m, ph, ports[0], ports[1], "rope_s")
        C = sin_phase(m, phc, ports[2], ports[3], "rope_c")
        x1, x2 = r1.data, r2.data
        y1 = sat(m, rsr_c(x1 * C - x2 * S, 30), 32, "rope_y1")
        y2 = sat(m, rsr_c(x2 * C + x1 * S, 30), 32, "rope_y2")
        m.d.comb += [r1.addr.eq(idx), r2.addr.eq(idx + half)]
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [n.eq(self.n), half.eq(self.n >> 1), pos.eq(self.pos), idx.eq(0)]
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [self.busy.eq(1), self.i.ready.eq(1), wp.en.eq(self.i.valid), wp.addr.eq(idx),
                             wp.data.eq(self.i.payload)]
                with m.If(self.i.valid):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx + 1 == n):
                        m.d.sync += idx.eq(0)
                        m.next = "ROT"
            with m.State("ROT"):
                fire = self.f.valid & self.o.ready
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(self.f.valid), self.f.ready.eq(self.o.ready),
                             self.o.payload.eq(y1), wp.en.eq(fire), wp.addr.eq(idx + half), wp.data.eq(y2)]
                with m.If(fire):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx + 1 == half):
                        m.d.sync += idx.eq(0)
                        m.next = "OUT2"
            with m.State("OUT2"):
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(1), self.o.payload.eq(r2.data)]
                with m.If(self.o.ready):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx + 1 == half):
                        m.next = "IDLE"
        return m


# --------------------------------------------------------------------------------------------------
# softmax (numerics.softmax_q24): log2-domain scores Q16.16 [n] on i -> probabilities Q8.24 [n] on o
# --------------------------------------------------------------------------------------------------
class Softmax(wiring.Component):
    def __init__(self, max_n: int):
        self.max_n = max_n
        super().__init__({"start": In(1), "n": In(range(max_n + 1)), "i": In(i32_stream()), "o": Out(i32_stream()),
                          "busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.div = div = Divider(63, 48)
        wp, (rp,) = row_buffer(m, "buf", self.max_n)
        e0, e1 = rom(m, "exp2_rom", nx.EXP2_LUT, signed(32), 2)
        n = Signal(range(self.max_n + 1))
        idx = Signal(range(self.max_n + 1))
        mx = Signal(signed(32))
        total = Signal(48)
        RS = Signal(63)
        m.d.comb += [rp.addr.eq(idx), wp.addr.eq(idx)]
        u = Signal(33)
        m.d.comb += u.eq(mx - rp.data)
        ip = u[16:]
        m.d.comb += [e0.addr.eq(u[8:16]), e1.addr.eq(u[8:16] + 1)]
        val = Signal(signed(33))
        m.d.comb += val.eq(e0.data - rsr_c((e0.data - e1.data) * u[:8], 8))
        e = Signal(signed(32))
        m.d.comb += e.eq(Mux(ip < 62, rsr(val, ip[:6]), 0))
        p = Signal(signed(96))
        m.d.comb += p.eq(rsr_c(rp.data * RS, 38))
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [n.eq(self.n), idx.eq(0), mx.eq(I32_MIN), total.eq(0)]
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [self.busy.eq(1), self.i.ready.eq(1), wp.en.eq(self.i.valid), wp.data.eq(self.i.payload)]
                with m.If(self.i.valid):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(self.i.payload > mx):
                        m.d.sync += mx.eq(self.i.payload)
                    with m.If(idx + 1 == n):
                        m.d.sync += idx.eq(0)
                        m.next = "EXP"
            with m.State("EXP"):
                m.d.comb += [self.busy.eq(1), wp.en.eq(1), wp.data.eq(e)]
                m.d.sync += [total.eq(total + e), idx.eq(idx + 1)]
                with m.If(idx + 1 == n):
                    m.next = "DIV0"
            with m.State("DIV0"):
                m.d.comb += [self.busy.eq(1), div.start.eq(1), div.num.eq(1 << 62), div.den.eq(total)]
                m.d.sync += idx.eq(0)
                m.next = "DIV"
            with m.State("DIV"):
                m.d.comb += self.busy.eq(1)
                with m.If(~div.busy):
                    m.d.sync += RS.eq(div.quo)
                    m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(1), self.o.payload.eq(p)]
                with m.If(self.o.ready):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx + 1 == n):
                        m.next = "IDLE"
        return m


# --------------------------------------------------------------------------------------------------
# argmax (numerics.argmax_first): n values on i -> the index of the first largest on o
# --------------------------------------------------------------------------------------------------
class Argmax(wiring.Component):
    def __init__(self, max_n: int = 1 << 20):
        self.max_n = max_n
        super().__init__({"start": In(1), "n": In(range(max_n + 1)), "i": In(i32_stream()), "o": Out(i32_stream()),
                          "busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        n = Signal(range(self.max_n + 1))
        idx = Signal(range(self.max_n + 1))
        best = Signal(signed(32))
        arg = Signal(range(self.max_n + 1))
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [n.eq(self.n), idx.eq(0), arg.eq(0)]
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [self.busy.eq(1), self.i.ready.eq(1)]
                with m.If(self.i.valid):
                    m.d.sync += idx.eq(idx + 1)
                    with m.If((idx == 0) | (self.i.payload > best)):
                        m.d.sync += [best.eq(self.i.payload), arg.eq(idx)]
                    with m.If(idx + 1 == n):
                        m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += [self.busy.eq(1), self.o.valid.eq(1), self.o.payload.eq(arg)]
                with m.If(self.o.ready):
                    m.next = "IDLE"
        return m


# --------------------------------------------------------------------------------------------------
# the SFU: one command interface over all the operations
# --------------------------------------------------------------------------------------------------
OP_QUANT, OP_RMSNORM, OP_SILUMUL, OP_ADD, OP_ROPE, OP_SOFTMAX, OP_ARGMAX = range(7)
OP_NAMES = {OP_QUANT: "quant", OP_RMSNORM: "rmsnorm", OP_SILUMUL: "silumul", OP_ADD: "add", OP_ROPE: "rope",
            OP_SOFTMAX: "softmax", OP_ARGMAX: "argmax"}


class SFU(wiring.Component):
    """Command: ``op``, ``n`` (row length), ``quant`` (RMSNORM / SILUMUL: quantize the result to X8 as
    the instructions do; 0 gives the X32 result), ``e40`` (RMSNorm eps), ``pos`` (RoPE), latched by a
    ``start`` pulse. Streams: ``i`` the row (RMSNORM x, QUANT x, SILUMUL gate, ADD a, ROPE x, SOFTMAX s,
    ARGMAX logits), ``b`` the second operand (RMSNORM gamma, SILUMUL up, ADD b, ROPE frequency words),
    ``o`` the result (X8 results: n codes then the scale word). ``busy`` until the last output."""

    def __init__(self, max_d: int, max_hd: int = 256, max_n: int | None = None, max_v: int = 1 << 20):
        if max_d <= 0 or max_hd <= 0 or max_hd % 2:
            raise AccllmError(f"SFU needs max_d > 0 and an even max_hd > 0, got {max_d}, {max_hd}")
        self.max_d, self.max_hd, self.max_n, self.max_v = max_d, max_hd, max_n or max_d, max_v
        super().__init__({"start": In(1), "op": In(3), "n": In(range(max(max_d, max_v) + 1)), "quant": In(1),
                          "e40": In(64), "pos": In(32),
                          "i": In(i32_stream()), "b": In(i32_stream()), "o": Out(i32_stream()), "busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.aq = aq = ActQuant(self.max_d)
        m.submodules.rn = rn = RMSNorm(self.max_d)
        m.submodules.ew = ew = EltWise()
        m.submodules.rope = rope = RoPE(self.max_hd)
        m.submodules.sm = sm = Softmax(self.max_n)
        m.submodules.am = am = Argmax(self.max_v)
        op = Signal(3)
        quant = Signal()
        running = Signal()
        left = Signal(range(max(self.max_d, self.max_v) + 2))   # outputs still to come (element-wise ops)
        with m.If(self.start):
            m.d.sync += [op.eq(self.op), quant.eq(self.quant), running.eq(1)]
        st = self.start
        m.d.comb += [rn.n.eq(self.n), rn.e40.eq(self.e40), aq.n.eq(self.n), rope.n.eq(self.n), rope.pos.eq(self.pos),
                     sm.n.eq(self.n), am.n.eq(self.n)]
        m.d.comb += [rn.start.eq(st & (self.op == OP_RMSNORM)), rope.start.eq(st & (self.op == OP_ROPE)),
                     sm.start.eq(st & (self.op == OP_SOFTMAX)), am.start.eq(st & (self.op == OP_ARGMAX)),
                     aq.start.eq(st & ((self.op == OP_QUANT) | (((self.op == OP_RMSNORM) | (self.op == OP_SILUMUL))
                                                                 & self.quant)))]
        with m.If(st & ((self.op == OP_SILUMUL) | (self.op == OP_ADD))):
            m.d.sync += left.eq(self.n)
        m.d.comb += ew.op.eq(op == OP_SILUMUL)

        def route(src, dst):
            m.d.comb += [dst.valid.eq(src.valid), dst.payload.eq(src.payload), src.ready.eq(dst.ready)]

        # the result stream before quantization (X32) of RMSNORM / SILUMUL
        pre = stream.Signature(signed(32)).create()
        with m.Switch(op):
            with m.Case(OP_QUANT):
                route(self.i, aq.i)
                route(aq.o, self.o)
            with m.Case(OP_RMSNORM):
                route(self.i, rn.i)
                route(self.b, rn.g)
                route(rn.o, pre)
            with m.Case(OP_SILUMUL, OP_ADD):
                route(self.i, ew.a)
                route(self.b, ew.b)
                route(ew.o, pre)
            with m.Case(OP_ROPE):
                route(self.i, rope.i)
                m.d.comb += [rope.f.valid.eq(self.b.valid), rope.f.payload.eq(self.b.payload),
                             self.b.ready.eq(rope.f.ready)]
                route(rope.o, self.o)
            with m.Case(OP_SOFTMAX):
                route(self.i, sm.i)
                route(sm.o, self.o)
            with m.Case(OP_ARGMAX):
                route(self.i, am.i)
                route(am.o, self.o)
        with m.If((op == OP_RMSNORM) | (op == OP_SILUMUL) | (op == OP_ADD)):
            with m.If(quant & (op != OP_ADD)):
                route(pre, aq.i)
                route(aq.o, self.o)
            with m.Else():
                route(pre, self.o)
        with m.If((op == OP_SILUMUL) | (op == OP_ADD)):
            with m.If(ew.o.valid & ew.o.ready & (left != 0)):
                m.d.sync += left.eq(left - 1)
        unit_busy = Signal()
        m.d.comb += unit_busy.eq(aq.busy | rn.busy | rope.busy | sm.busy | am.busy | (left != 0))
        # one cycle after start the unit's own busy has risen; running covers that cycle
        with m.If(running & ~self.start):
            m.d.sync += running.eq(0)
        m.d.comb += self.busy.eq(running | unit_busy)
        return m
