"""Differential fuzzing: random programs on the functional model (sim/emu.py) and on the RTL kernel under
Verilator (sim/tb/model/harness.DevicePair, the kernel with every unit), every io and weight byte and the
status code (and failing index) compared.

Valid programs: one to three instructions (row units, EMBED, ARGMAX, MATMUL dense / 2:4 / accumulate /
lm_head, ATTN on a Λ ring or a linear cache with either RoPE mode and optionally SpAtten, TOPK) with random
shapes up to the configuration's limits, bit widths, groups, sparsity, sink / window / slots, positions up to
the 32-bit register's end, register flags and n_tokens, on buffers of random bytes. Illegal programs: one
of those with one thing broken -- an unknown opcode, a reserved field or flag bit, no END, n_tokens outside
1..max_prefill, a width beyond max_hidden, a descriptor's magic or a field out of range, an operand past the
4 GiB offset space, a token id outside the table, a position past a linear cache.

Not compared (documented differences, docs/rtl.md "Limits" and "Row-operation units"): accesses past the
end of a buffer but inside the 32-bit offset space (the register map has no buffer sizes: the RTL cannot
see them; the functional model stops with STATUS_ADDR_RANGE / STATUS_KV_REGION), and the RTL-only limits
(EMBED with 4·D not a multiple of the port width, ARGMAX to a destination not 4-byte aligned, groups below
16); the generators stay clear of them.

The fast slice (a fixed, derandomized example budget) runs by default; the long slice is in the slow
marker (`make test-all`). A failing example is printed with its drawn values and a reproduce blob.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hw import isa, memmap, regmap
from hw import numerics as nx
from test_rtl_model import CFG, P, _attn_desc, _random_state, _spatten, _topk_spatten, _x32_rows

IO_BYTES = W_BYTES = 1 << 17
PROG_BYTES = 4096
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
W_HEAP = 0x4000                          # weights below: TOPK's SpAtten descriptor and state (test_rtl_model)
POS_LAST = (1 << 32) - 2                      # the last position the runtime lets a run reach
FAST_EXAMPLES, SLOW_EXAMPLES = 50, 2000


@pytest.fixture(scope="module")
def fuzz_pair():
    from sim.tb.model.harness import DevicePair
    p = DevicePair(CFG, io_bytes=IO_BYTES, w_bytes=W_BYTES, prog_bytes=PROG_BYTES)
    yield p
    p.close()


class NoRoom(Exception):
    pass


class Heap:
    """64-byte aligned bump allocation in a buffer."""

    def __init__(self, size: int, start: int = 0):
        self.top, self.size = start, size

    def take(self, n: int) -> int:
        at = memmap.align(self.top)
        if at + n > self.size:
            raise NoRoom(n)
        self.top = at + n
        return at


class Case:
    """One program being built: the heaps of io and the weight buffers (the lockstep area first), the
    uploads, the instructions and the run registers."""

    def __init__(self, data, rng):
        self.data, self.rng = data, rng
        self.io = Heap(IO_BYTES)
        self.w = Heap(W_BYTES, W_HEAP)  # the same offsets on every port (lockstep); port 0 constants too
        self.uploads: list[tuple[str, int, bytes]] = []
        self.prog: list[isa.Instr] = []
        self.T = 1
        self.position = 0
        self.flags = 0
        self.notes: list[str] = []
        self.bad: str | None = None

    def draw(self, strategy, label=None):
        return self.data.draw(strategy, label=label)

    def put(self, buf: str, off: int, data) -> None:
        self.uploads.append((buf, off, bytes(np.asarray(data).tobytes() if isinstance(data, np.ndarray) else data)))

    def x32(self, T, D, label):
        """Random X32 rows (amplitude drawn, some zero rows and int32 extremes)."""
        amp = self.draw(st.sampled_from([1 << 4, 1 << 16, 1 << 20, 1 << 24, 1 << 31]), label + " amplitude")
        rows = _x32_rows(self.rng, T, D, amp)
        body = rows[:, :D]
        if self.draw(st.booleans(), label + " extremes"):
            body[self.rng.random(body.shape) < 0.05] = I32_MAX
            body[self.rng.random(body.shape) < 0.05] = I32_MIN
        if T > 1 and self.draw(st.booleans(), label + " a zero row"):
            body[self.rng.integers(0, T)] = 0
        off = self.io.take(rows.nbytes)
        self.put("io", off, rows.astype("<i4"))
        return off, rows

    def x8(self, T, K, label):
        """Random X8 rows: codes in [-127, 127] (extremes included), scale words ma in [1, 2**15], ea 0..24."""
        codes = self.rng.integers(-127, 128, (T, K))
        if self.draw(st.booleans(), label + " saturated codes"):
            codes[self.rng.random(codes.shape) < 0.5] = 127
        ma = self.rng.integers(1, (1 << 15) + 1, T)
        ea = self.rng.integers(0, self.draw(st.integers(1, 25), label + " ea range"), T)
        ma[0] = self.draw(st.sampled_from([1, 1 << 14, 1 << 15]), label + " ma of row 0")
        buf = bytearray(T * memmap.stride8(K))
        for t in range(T):
            r = t * memmap.stride8(K)
            buf[r:r + 4] = int(ma[t] | ea[t] << 16).to_bytes(4, "little")
            buf[r + 64:r + 64 + K] = codes[t].astype(np.int8).tobytes()
        off = self.io.take(len(buf))
        self.put("io", off, bytes(buf))
        return off


# ----------------------------------------------------------------------------------------------------
# valid instructions
# ----------------------------------------------------------------------------------------------------
def _width(c, label, hi=CFG.max_hidden):
    return c.draw(st.one_of(st.integers(1, 96), st.integers(1, hi), st.sampled_from([1, 16, hi - 1, hi])), label)


def _fit_tokens(c, row_bytes):
    """n_tokens that keep every operand of the program inside io (a few operands per instruction)."""
    return max(1, min(c.T, (IO_BYTES // 8) // max(row_bytes, 1)))


def op_row(c, bad=None):
    op = c.draw(st.sampled_from([isa.QUANT, isa.RMSNORM, isa.SILUMUL, isa.ADD]), "row op")
    if bad in ("descriptor magic", "norm width"):
        op = isa.RMSNORM
    D = _width(c, "D", CFG.max_hidden)
    if bad == "width":
        D = c.draw(st.sampled_from([0, CFG.max_hidden + 1, 0xFFFF]), "bad width")
    Dr = min(max(D, 1), 64) if bad == "width" else D     # the unit stops before it reads
    T = c.T = min(c.T, _fit_tokens(c, memmap.stride32(2 * Dr if op == isa.SILUMUL else Dr)))
    src, _ = c.x32(T, 2 * Dr if op == isa.SILUMUL else Dr, "src")
    if op == isa.ADD:
        dst, _ = c.x32(T, Dr, "dst")
    else:
        dst = c.io.take(T * memmap.stride8(Dr))
    d = 0
    if op == isa.RMSNORM:
        gamma = c.rng.integers(-(1 << 20), 1 << 20, Dr)
        if c.draw(st.booleans(), "gamma extremes"):
            gamma[:2] = [I32_MAX, I32_MIN][:Dr]
        eps = c.draw(st.sampled_from([0.0, 1e-6, 1e-5, 1e-2, 1.0]), "eps")
        Dn = Dr + (c.draw(st.sampled_from([-1, 1]) if Dr > 1 else st.just(1), "gamma width off by")
                   if bad == "norm width" else 0)
        blob = memmap.pack_norm(gamma[:Dn] if Dn <= Dr else np.concatenate([gamma, [7]]), eps)
        d = c.w.take(len(blob))
        if bad == "descriptor magic":
            blob = bytes([blob[0] ^ 0xFF]) + blob[1:]
        c.put("weights0", d, blob)
    c.prog.append(isa.Instr(op, a=dst, b=src, c=D, d=d))


def op_embed(c, bad=None):
    V = c.draw(st.integers(1, 300), "V")
    D = 8 * c.draw(st.integers(1, 64), "D / 8")            # 4·D a multiple of the 32-byte port (RTL limit)
    table = c.rng.integers(-(1 << 31), 1 << 31, (V, D))
    imgs = memmap.pack_embedding(table, P)
    d = c.w.take(max(len(i) for i in imgs))
    for p_, img in enumerate(imgs):
        if bad == "descriptor magic" and p_ == 0:
            img = bytes([img[0] ^ 0x5A]) + img[1:]
        c.put(f"weights{p_}", d, img)
    T = c.T = min(c.T, _fit_tokens(c, memmap.stride32(D)))
    ids = c.rng.integers(0, V, T)
    ids[: min(2, T)] = [0, V - 1][: min(2, T)]
    if bad == "token id":
        ids[c.rng.integers(0, T)] = c.draw(st.sampled_from([V, V + 1000, -1, I32_MIN]), "bad id")
    src = c.io.take(4 * T)
    c.put("io", src, ids.astype("<i4"))
    dst = c.io.take(T * memmap.stride32(D))
    Dc = D + (c.draw(st.sampled_from([-8, 8]), "width off by") if bad == "width" else 0)
    c.prog.append(isa.Instr(isa.EMBED, a=dst, b=src, c=Dc, d=d))


def op_argmax(c, bad=None):
    V = c.draw(st.one_of(st.integers(1, 64), st.integers(1, 4096)), "V")
    T = c.T = min(c.T, _fit_tokens(c, memmap.stride32(V)))
    src, rows = c.x32(T, V, "logits")
    if c.draw(st.booleans(), "a tie"):
        j = c.rng.integers(0, V, 2)
        rows[T - 1, j] = I32_MAX
        c.uploads[-1] = ("io", src, rows.astype("<i4").tobytes())
    dst = c.io.take(64) + 4 * c.draw(st.integers(0, 15), "dst word")
    c.prog.append(isa.Instr(isa.ARGMAX, a=dst, b=src, d=V))


def _linear(c, N, K, bits, group, sparse, scale_bits=CFG.scale_bits):
    qmax = (1 << bits) - 1
    G = K // group
    zeros = c.rng.integers(0, qmax + 1, (N, G))
    M = c.rng.integers(0, 1 << scale_bits, (N, G))
    if c.draw(st.booleans(), "scale extremes"):
        M[:, 0] = (1 << scale_bits) - 1
    SH = c.rng.integers(*c.draw(st.sampled_from([(14, 30), (-8, 1), (-128, 128), (30, 70)]), "SH range"), N)
    SH = np.clip(SH, -128, 127)
    if sparse:
        idx = c.rng.integers(0, 6, (N, K // 4))
        kept = c.rng.integers(0, qmax + 1, (N, K // 2))
        return memmap.pack_linear(kept, zeros, M, SH, bits, group, idx=idx, ports=P, scale_bits=scale_bits)
    codes = c.rng.integers(0, qmax + 1, (N, K))
    if c.draw(st.booleans(), "a group of zero weights"):
        codes[0, :group] = zeros[0, 0]
    return memmap.pack_linear(codes, zeros, M, SH, bits, group, ports=P, scale_bits=scale_bits)


LIN_FIELDS = {"N": (4, "<I"), "K": (8, "<I"), "rows_per_port": (12, "<I"), "bits": (16, "<B"), "sparse": (17, "<B"),
              "group": (18, "<H"), "scale_bits": (20, "<I"), "record": (24, "<I"), "ports": (32, "<I")}


def op_matmul(c, bad=None):
    bits = c.draw(st.sampled_from([2, 4, 8]), "bits")
    group = c.draw(st.sampled_from([16, 32, 64, 128]), "group")
    sparse = c.draw(st.booleans(), "2:4")
    K = group * c.draw(st.one_of(st.integers(1, 4), st.integers(1, CFG.max_hidden // group)), "K / group")
    rec = memmap.RowRecord(K, bits, group, sparse, 16).size
    nmax = max(1, min(96, (W_BYTES // 4) // rec * P))
    N = c.draw(st.one_of(st.integers(1, 8), st.integers(1, nmax)), "N")
    other = bad == "descriptor field" and c.draw(st.booleans(), "packed for the other scale width")
    imgs = _linear(c, N, K, bits, group, sparse, 24 - CFG.scale_bits if other else CFG.scale_bits)
    if other:
        c.notes.append(f"linear packed with {24 - CFG.scale_bits}-bit scales")
    elif bad == "descriptor field":
        import struct
        name = c.draw(st.sampled_from(sorted(LIN_FIELDS)), "linear field")
        at, fmt = LIN_FIELDS[name]
        val = c.draw(st.sampled_from({"N": [0], "K": [0, CFG.max_hidden + group, K + 4], "bits": [0, 1, 3, 5, 16],
                                      "group": [0, 4, 8, 12, 256, group + 4], "sparse": [2], "ports": [1, P + 1],
                                      "scale_bits": [4, 16, 24 - CFG.scale_bits], "record": [rec + 16, 0],
                                      "rows_per_port": [0]}[name]), name + " value")
        imgs = [img[:at] + struct.pack(fmt, val) + img[at + struct.calcsize(fmt):] for img in imgs]
        c.notes.append(f"linear {name}={val}")
    if bad == "descriptor magic":
        imgs = [bytes([img[0] ^ 0x11]) + img[1:] for img in imgs]
    d = c.w.take(max(len(i) for i in imgs))
    for p_, img in enumerate(imgs):
        c.put(f"weights{p_}", d, img)
    T = c.T = min(c.T, _fit_tokens(c, memmap.stride8(K) + memmap.stride32(N)))
    src = c.x8(T, K, "x8")
    f = c.draw(st.sampled_from([0, isa.F_ACC, isa.F_LOGITS, isa.F_ACC | isa.F_LOGITS]), "MATMUL flags")
    dst, _ = c.x32(T, N, "dst")
    c.prog.append(isa.Instr(isa.MATMUL, a=dst, b=src, c=c.draw(st.integers(0, 3), "layer tag"), d=d, flags=f))


def _attn_geometry(c, bad=None):
    Hkv = c.draw(st.integers(1, 4), "kv heads")
    grp = c.draw(st.sampled_from([1, 2, 3, 4]), "heads per kv head")
    hd = 16 * c.draw(st.integers(1, 8), "head_dim / 16")
    Hq = Hkv * grp
    if Hq * hd > CFG.max_hidden:
        hd = 16 * max(1, CFG.max_hidden // (16 * Hq))
    m = hd // 16
    vg = 16 * c.draw(st.sampled_from([k for k in range(1, m + 1) if m % k == 0]), "vgroup / 16")
    ring = c.draw(st.booleans(), "ring") and bad != "position"
    big = c.draw(st.sampled_from([False, False, False, True]), "a large cache")
    if ring:
        S = c.draw(st.integers(0, 4), "sink")
        W = c.draw(st.integers(1, 400 if big else 12), "window")
        slots = S + W
    else:
        S = W = 0
        slots = c.draw(st.integers(1, CFG.max_context if big else 24), "slots")
    # the K and V areas within a third of a weight buffer
    lay = memmap.kv_layout(1, -(-Hkv // P), hd, 1, vg)
    fit = (W_BYTES // 3) // (-(-Hkv // P) * lay["v_slot"])
    if slots > fit:
        S, W, slots = (min(S, fit - 1), fit - min(S, fit - 1), fit) if ring else (0, 0, fit)
    return dict(Hq=Hq, Hkv=Hkv, hd=hd, vg=vg, S=S, W=W, slots=slots, ring=int(ring))


def _kv_area(c, g):
    lay = memmap.kv_layout(1, -(-g["Hkv"] // P), g["hd"], g["slots"], g["vg"])
    k_off = c.w.take(lay["k_bytes"])
    v_off = c.w.take(lay["v_bytes"])
    return k_off, v_off


def _position(c, g, T):
    if g["ring"]:
        where = c.draw(st.sampled_from(["start", "wraps", "register end"]), "position")
        if where == "start":
            return c.draw(st.integers(0, g["slots"] + 2), "pos")
        if where == "wraps":
            return c.draw(st.integers(0, 50 * g["slots"] + 1000), "pos")
        return POS_LAST - T + 1 - c.draw(st.integers(0, 3 * g["slots"]), "pos below the end")
    return c.draw(st.integers(0, g["slots"] - T), "pos") if T <= g["slots"] else None


ATN_BAD = {"heads": 2, "kv_heads": 3, "head_dim": 4, "sink": 5, "window": 6, "slots": 7, "ring": 9, "vgroup": 14,
           "kv_bits": 15, "rope_mode": 8}


def op_attn(c, bad=None, spatten=False, g=None):
    g = g or _attn_geometry(c, bad)
    T = c.T = min(c.T, _fit_tokens(c, memmap.stride32((g["Hq"] + 2 * g["Hkv"]) * g["hd"])))
    # the RTL's time: about Hq * kept * head_dim / 16 cycles per token; a few hundred thousand per run at most
    T = c.T = max(1, min(T, 300_000 // (g["Hq"] * min(g["slots"] + T, g["slots"] + 32) * (g["hd"] // 16 + 2))))
    if not g["ring"]:
        T = c.T = min(T, g["slots"])
    pos = _position(c, g, T)
    if bad == "position" and not g["ring"]:
        pos = g["slots"] - T + c.draw(st.integers(1, 1000), "past the cache by")
    c.position = pos
    k_off, v_off = _kv_area(c, g)           # the old cache contents: the random bytes of the buffers
    at = c.w.take(0x400)
    kl = memmap.kconst_layout(g["Hkv"], g["hd"])["_size"][0]
    kconst = c.w.take(kl) - at
    rope_mode = c.draw(st.sampled_from([memmap.ROPE_ORIGINAL, memmap.ROPE_CACHE]), "rope mode")
    layer = c.draw(st.integers(0, 2), "layer")
    pend = _PendingPair(c)
    _attn_desc(pend, c.rng, at, Hq=g["Hq"], Hkv=g["Hkv"], hd=g["hd"], vg=g["vg"], S=g["S"], W=g["W"], slots=g["slots"],
               ring=g["ring"], rope_mode=rope_mode, layer=layer, rope_at=0x80, kconst_at=kconst, k_off=k_off,
               v_off=v_off, magic_ok=bad != "descriptor magic")
    if bad == "descriptor field":
        name = c.draw(st.sampled_from(sorted(ATN_BAD)), "attention field")
        val = c.draw(st.sampled_from({"heads": [0, g["Hq"] + 1], "kv_heads": [0, g["Hkv"] + 1] if g["Hkv"] < 4 else [0],
                                      "head_dim": [0, g["hd"] + 8, 144], "sink": [g["S"] + 1], "window": [0, g["W"] + 1],
                                      "slots": [0, CFG.max_context + 1, g["slots"] + 1], "ring": [1],
                                      "vgroup": [0, 8, g["vg"] + 8], "kv_bits": [2, 8], "rope_mode": [2]}[name]),
                     name + " value")
        pend.patch_word("weights0", at, ATN_BAD[name], val)
        c.notes.append(f"attention {name}={val}")
    flags = 0
    if spatten:
        flags = isa.F_SPATTEN
        spt_at = c.w.take(0x100)
        L = c.draw(st.integers(layer + 1, layer + 3), "SpAtten layers")
        lay = memmap.spatten_state_layout(g["slots"], g["Hq"])
        state = c.w.take(L * lay["layer_bytes"])
        pend.upload("weights0", memmap.pack_attn_ext(spt_at), at + 0x40)
        over = {}
        if bad == "spatten":
            k_, v_ = c.draw(st.sampled_from([("layers", layer), ("slots", g["slots"] + 1), ("heads", g["Hq"] + 1),
                                             ("state_off", state + 8), ("magic_ok", False)]), "SpAtten field")
            over = {k_: v_}
            c.notes.append(f"SpAtten {k_}={v_}")
        st_ = _spatten(pend, layers=over.pop("layers", L), slots=over.pop("slots", g["slots"]),
                       heads=over.pop("heads", g["Hq"]), S=g["S"], W=g["W"], ring=g["ring"],
                       state_at=over.pop("state_off", state), at=spt_at, **over)
        for li in range(L):
            hdead = (c.rng.random(g["Hq"]) < 0.3).astype(np.uint8)
            _random_state(pend, c.rng, st_, li, g["slots"], g["Hq"], heads_dead=hdead, state_at=state)
    T_ = c.T
    src, _ = c.x32(T_, (g["Hq"] + 2 * g["Hkv"]) * g["hd"], "qkv")
    dst = c.io.take(T_ * memmap.stride8(g["Hq"] * g["hd"]))
    c.prog.append(isa.Instr(isa.ATTN, a=dst, b=src, c=layer, d=at, flags=flags))


def op_topk(c, bad=None):
    ring = c.draw(st.booleans(), "ring")
    H = c.draw(st.integers(1, 12), "heads")
    L = c.draw(st.integers(1, 4), "layers")
    if ring:
        S, W = c.draw(st.integers(0, 4), "sink"), c.draw(st.integers(1, 40), "window")
        slots = S + W
    else:
        S, W, slots = c.draw(st.integers(0, 4), "sink"), 0, c.draw(st.integers(1, 200), "slots")
    R = c.draw(st.integers(0, 4), "recent")
    start = c.draw(st.integers(0, L - 1), "start layer")
    keep = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
    tq = [c.draw(keep, "token keep") for _ in range(L)]
    hq = [c.draw(keep, "head keep") for _ in range(L)]
    c.position = c.draw(st.one_of(st.integers(0, 3 * slots), st.just(POS_LAST - c.T + 1)), "pos")
    over = {}
    if bad == "spatten":
        k_, v_ = c.draw(st.sampled_from([("magic", 0x12345678), ("start", L), ("heads", memmap.spatten_max_heads(
            CFG.max_hidden) + 1), ("slots", slots + 1 if ring else 0), ("imp_off", 8)]), "SpAtten field")
        over = {k_: v_}
        c.notes.append(f"SpAtten {k_}={v_}")
    pend = _PendingPair(c)
    args = dict(L=L, S=S, W=W, slots=slots, ring=int(ring), R=R, H=H, start=start, tq=tq, hq=hq,
                flags=c.draw(st.booleans(), "random pruned flags"))
    for k_ in ("start", "slots", "L"):
        if k_ in over:
            args[k_] = over.pop(k_)
    # _topk_spatten writes at fixed offsets (descriptor 0x1000, state from 0x2000): below the heap (W_HEAP)
    assert 0x2000 + L * memmap.spatten_state_layout(max(args["slots"], 1), H)["layer_bytes"] <= W_HEAP
    _topk_spatten(pend, c.rng, **args, **over)
    c.prog.append(isa.Instr(isa.TOPK, d=0x1000))


class _PendingPair:
    """What the test_rtl_model builders write to (pair.upload), recorded into the case's uploads."""

    def __init__(self, c):
        self.c = c

    def upload(self, name, data, offset=0):
        self.c.put(name, offset, np.asarray(data) if isinstance(data, np.ndarray) else bytes(data))

    def patch_word(self, name, at, word, val):
        for i in range(len(self.c.uploads) - 1, -1, -1):
            b, off, blob = self.c.uploads[i]
            if b == name and off <= at + 4 * word < off + len(blob):
                k = at + 4 * word - off
                blob = blob[:k] + int(val).to_bytes(4, "little") + blob[k + 4:]
                self.c.uploads[i] = (b, off, blob)
                return
        raise AssertionError("descriptor word not found")


POSITIONAL = ("attn", "attn+spatten", "topk")
VALID_OPS = {"row": op_row, "embed": op_embed, "argmax": op_argmax, "matmul": op_matmul, "attn": op_attn,
             "attn+spatten": lambda c, bad=None: op_attn(c, bad, spatten=True), "topk": op_topk}
# what each kind of illegal program breaks, and in which instruction kinds
ILLEGAL = {"width": ["row", "embed"], "norm width": ["row"], "descriptor magic": ["row", "embed", "matmul", "attn"],
           "descriptor field": ["matmul", "attn"], "token id": ["embed"], "position": ["attn"],
           "spatten": ["attn+spatten", "topk"], "opcode": None, "reserved field": None, "flag bit": None,
           "no END": None, "n_tokens": None, "past 4 GiB": None}


def build(data, illegal: bool) -> Case:
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), "numpy seed"))
    c = Case(data, rng)
    c.T = data.draw(st.one_of(st.integers(1, 4), st.integers(1, CFG.max_prefill), st.just(CFG.max_prefill)), "n_tokens")
    c.flags = data.draw(st.integers(0, 3), "register flags")
    bad = data.draw(st.sampled_from(sorted(ILLEGAL)), "illegal") if illegal else None
    broken_kind = data.draw(st.sampled_from(ILLEGAL[bad]), "broken op") if bad and ILLEGAL[bad] else None
    positional = broken_kind in POSITIONAL        # one position per run: one instruction that reads it
    for i in range(data.draw(st.integers(1, 3), "instructions")):
        kind = data.draw(st.sampled_from(sorted(VALID_OPS)), "op")
        if kind in POSITIONAL:
            kind, positional = ("row", positional) if positional else (kind, True)
        if data.draw(st.booleans(), "a NOP before"):
            c.prog.append(isa.Instr(isa.NOP))
        VALID_OPS[kind](c)
    if broken_kind:                    # last: what runs before it is compared too
        VALID_OPS[broken_kind](c, bad=bad)
    c.prog.append(isa.Instr(isa.END))
    c.plen = len(c.prog)
    if bad == "opcode":
        i = data.draw(st.integers(0, len(c.prog) - 1), "at")
        ops = [o for o in range(256) if o not in isa.OPS]
        c.raw = {i: bytes([data.draw(st.sampled_from(ops), "opcode")]) + isa.encode(c.prog[i])[1:]}
    elif bad in ("reserved field", "flag bit"):
        i = data.draw(st.integers(0, len(c.prog) - 1), "at")
        ins = c.prog[i]
        spec = isa.OPS[ins.op]
        w = bytearray(isa.encode(ins))
        if bad == "flag bit":
            free = [b for b in range(8) if not spec.flags >> b & 1]
            w[1] |= 1 << data.draw(st.sampled_from(free), "flag bit")
        else:
            unused = [f for f in ("a", "b", "c", "d") if f not in spec.fields]
            if unused:
                lo, hi = {"c": (2, 4), "a": (4, 8), "b": (8, 12), "d": (12, 16)}[data.draw(st.sampled_from(unused), "field")]
                w[data.draw(st.integers(lo, hi - 1), "byte")] |= 1 << data.draw(st.integers(0, 7), "bit")
            else:                      # every field used: an undefined flag bit instead
                w[1] |= 1 << data.draw(st.sampled_from([b for b in range(8) if not spec.flags >> b & 1]), "flag bit")
        c.raw = {i: bytes(w)}
    else:
        c.raw = {}
    if bad == "no END":
        c.plen = data.draw(st.integers(0, len(c.prog) - 1), "program_len")
    if bad == "n_tokens":
        c.T = data.draw(st.sampled_from([0, CFG.max_prefill + 1, 1 << 16, (1 << 32) - 1]), "bad n_tokens")
    if bad == "past 4 GiB":
        i = data.draw(st.integers(0, len(c.prog) - 2), "at") if len(c.prog) > 1 else 0
        ins = c.prog[i]
        spec = isa.OPS[ins.op]
        fs = [f for f in ("a", "b") if f in spec.fields]
        if fs:
            f = data.draw(st.sampled_from(fs), "operand")
            c.prog[i] = isa.Instr(ins.op, **{**dict(a=ins.a, b=ins.b, c=ins.c, d=ins.d, flags=ins.flags),
                                             f: (1 << 32) - 64 * data.draw(st.integers(1, 4), "64-byte steps below")})
            c.bad = bad
    if bad != "past 4 GiB":
        c.bad = bad
    return c


def _words(c):
    w = bytearray(isa.encode_program(c.prog))
    for i, raw in c.raw.items():
        w[16 * i:16 * i + 16] = raw
    return bytes(w)


def _run(pair, c):
    """Random bytes everywhere, then the case's uploads; run on both; the results of each side."""
    rng = c.rng
    pair.upload("io", rng.integers(0, 256, IO_BYTES, dtype=np.uint8))
    for p_ in range(P):
        pair.upload(f"weights{p_}", rng.integers(0, 256, W_BYTES, dtype=np.uint8))
    for buf, off, blob in c.uploads:
        pair.upload(buf, blob if isinstance(blob, (bytes, bytearray)) else bytes(blob), off)
    words = _words(c)
    pair.upload("program", words)
    out = {}
    for k, d in pair.devs.items():
        b = pair.bufs[k]
        for name in ["program", "io", "kv"] + [f"weights{p_}" for p_ in range(P)]:
            d.set_arg(name, b[name])
        d.set_arg("program_len", c.plen)
        if "entry" in d.args:
            d.set_arg("entry", 0)
        d.set_arg("position", c.position)
        d.set_arg("n_tokens", c.T)
        d.set_arg("flags", c.flags)
        d.start()
        code = d.wait(600.0)
        idx = d.read_status()[1]
        out[k] = (code, idx, b["io"].download(), [b[f"weights{p_}"].download() for p_ in range(P)])
    return out


def _compare(pair, c, out):
    from hypothesis import event, note
    e, r = out["emu"], out["rtl"]
    note(f"program: {[i.name for i in c.prog]} (bad: {c.bad}; {'; '.join(c.notes)}), n_tokens {c.T}, position "
         f"{c.position}, flags {c.flags}, program_len {c.plen}; emu: status {e[0]} at {e[1]} "
         f"({pair.devs['emu'].last_error}); rtl: status {r[0]} at {r[1]}")
    import re
    m = re.search(r"\[(\d+), (\d+)\) outside its buffer", pair.devs["emu"].last_error)
    if e[0] != r[0] and m and int(m.group(2)) <= 1 << 32:
        event("not compared: an access past a buffer's end, inside the 32-bit offset space (the RTL has no "
              "buffer sizes)")
        return
    event(f"status {regmap.STATUS_NAMES.get(e[0], e[0])}")
    assert r[0] == e[0] and (e[0] == 0 or r[1] == e[1]), f"status rtl={r[:2]} emu={e[:2]}"
    for name, a_, b_ in [("io", e[2], r[2])] + [(f"weights{p_}", e[3][p_], r[3][p_]) for p_ in range(P)]:
        a_, b_ = np.frombuffer(a_, np.uint8), np.frombuffer(b_, np.uint8)
        diff = np.nonzero(a_ != b_)[0]
        assert diff.size == 0, (f"{name}: {diff.size} bytes differ, first at {[hex(x) for x in diff[:8]]}: "
                                f"emu {a_[diff[:8]]} rtl {b_[diff[:8]]}")
    if c.bad is not None and c.bad not in ("width", "descriptor field"):
        assert e[0] != regmap.STATUS_OK, f"an illegal program ({c.bad}) ran to its end"


def _case(pair, data, illegal):
    from hypothesis import assume
    try:
        c = build(data, illegal)
    except NoRoom:
        assume(False)
    if c.position is None:
        assume(False)
    _compare(pair, c, _run(pair, c))


COMMON = dict(deadline=None, database=None, print_blob=True,
              phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@settings(max_examples=FAST_EXAMPLES, derandomize=True, **COMMON)
@given(data=st.data(), illegal=st.booleans())
def test_fuzz_emu_vs_rtl(fuzz_pair, data, illegal):
    _case(fuzz_pair, data, illegal)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **COMMON)
@given(data=st.data(), illegal=st.booleans())
def test_fuzz_emu_vs_rtl_long(fuzz_pair, data, illegal):
    _case(fuzz_pair, data, illegal)
