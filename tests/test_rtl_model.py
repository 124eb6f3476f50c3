"""Kernel level: programs of the row-operation units (EMBED, RMSNORM, QUANT, SILUMUL, ADD,
ARGMAX) on the RTL kernel under Verilator, every io byte compared with the functional model
(sim/emu.py) on the same program and buffers; bad input gives the same status code."""
import numpy as np
import pytest

from hw import isa, memmap, numerics as nx, regmap
from hw.config import load_hw

CFG = load_hw("sim-small")
P = CFG.weight_ports


@pytest.fixture(scope="module")
def pair():
    from sim.tb.model.harness import DevicePair
    p = DevicePair(CFG)
    yield p
    p.close()


def _x32_rows(rng, T, D, amp=1 << 20):
    st = memmap.stride32(D)
    buf = np.zeros((T, st // 4), np.int32)
    buf[:, :D] = rng.integers(-amp, amp, (T, D))
    return buf


def _fresh_io(pair, rng):
    io = rng.integers(0, 256, 1 << 16, dtype=np.uint8)    # random everywhere: untouched bytes are checked too
    pair.upload("io", io)


def _same(out, what):
    e, r = out["emu"], out["rtl"]
    # the index is meaningful only for a failure (emu reports the END word's index on success)
    assert r[0] == e[0] and (e[0] == 0 or r[1] == e[1]), f"{what}: status rtl={r[:2]} emu={e[:2]}"
    a, b = np.frombuffer(e[2], np.uint8), np.frombuffer(r[2], np.uint8)
    diff = np.nonzero(a != b)[0]
    assert diff.size == 0, f"{what}: {diff.size} io bytes differ, first at {diff[:8]} emu={a[diff[:8]]} rtl={b[diff[:8]]}"
    return e


def test_row_ops_bit_exact(pair):
    rng = np.random.default_rng(7)
    T = 3
    for D in (64, 40):
        _fresh_io(pair, rng)
        x = _x32_rows(rng, T, D)
        x[0, :D] = 0                                   # RMSNorm of zeros / QUANT of zeros
        x[1, 0] = (1 << 31) - 1                        # a saturating add
        y = _x32_rows(rng, T, D)
        y[1, 0] = 1 << 30
        gu = _x32_rows(rng, T, 2 * D, amp=1 << 19)
        pair.upload("io", x, 0x0)
        pair.upload("io", y, 0x1000)
        pair.upload("io", gu, 0x2000)
        gamma = rng.integers(-(1 << 17), 1 << 17, D)
        pair.upload("weights0", memmap.pack_norm(gamma, 1e-5), 0x400)
        prog = [isa.Instr(isa.QUANT, a=0x4000, b=0x0, c=D),
                isa.Instr(isa.RMSNORM, a=0x5000, b=0x0, c=D, d=0x400),
                isa.Instr(isa.RMSNORM, a=0x5800, b=0x1000, c=D, d=0x400),
                isa.Instr(isa.SILUMUL, a=0x6000, b=0x2000, c=D),
                isa.Instr(isa.ADD, a=0x1000, b=0x0, c=D),
                isa.Instr(isa.END)]
        e = _same(pair.run(prog, T), f"row ops D={D}")
        assert e[0] == regmap.STATUS_OK


def test_embed_and_argmax_bit_exact(pair):
    rng = np.random.default_rng(8)
    T, V, D = 4, 300, 64
    _fresh_io(pair, rng)
    table = rng.integers(-(1 << 20), 1 << 20, (V, D))
    imgs = memmap.pack_embedding(table, P)
    for p in range(P):
        pair.upload(f"weights{p}", np.frombuffer(imgs[p], np.uint8), 0x800)
    ids = np.array([0, V - 1, 151, 150], np.int32)     # both ports, first and last rows
    pair.upload("io", ids, 0x0)
    logits = _x32_rows(rng, T, V)
    logits[T - 1, 17] = logits[T - 1, 200] = (1 << 30)   # tie: lowest index wins
    pair.upload("io", logits, 0x3000)
    prog = [isa.Instr(isa.EMBED, a=0x100, b=0x0, c=D, d=0x800),
            isa.Instr(isa.ARGMAX, a=0x40, b=0x3000, d=V),
            isa.Instr(isa.END)]
    e = _same(pair.run(prog, T, flags=isa.RF_ARGMAX), "embed + argmax")
    assert np.frombuffer(e[2], np.int32)[0x40 // 4] == 17
    _same(pair.run(prog, T, flags=0), "argmax skipped without the flag")


def test_row_ops_bad_input(pair):
    rng = np.random.default_rng(9)
    _fresh_io(pair, rng)
    table = rng.integers(-(1 << 20), 1 << 20, (10, 64))
    imgs = memmap.pack_embedding(table, P)
    for p in range(P):
        pair.upload(f"weights{p}", np.frombuffer(imgs[p], np.uint8), 0x800)
    pair.upload("io", np.array([3, 10], np.int32), 0x0)        # id 10 is outside the 10-row table
    cases = {
        "width beyond max_hidden": ([isa.Instr(isa.QUANT, a=0x4000, b=0, c=CFG.max_hidden + 1)], regmap.STATUS_SHAPE),
        "width 0": ([isa.Instr(isa.ADD, a=0x4000, b=0, c=0)], regmap.STATUS_SHAPE),
        "embed width mismatch": ([isa.Instr(isa.EMBED, a=0x100, b=0, c=32, d=0x800)], regmap.STATUS_SHAPE),
        "token id outside the table": ([isa.Instr(isa.EMBED, a=0x100, b=0, c=64, d=0x800)], regmap.STATUS_ADDR_RANGE),
    }
    for what, (prog, code) in cases.items():
        out = pair.run([isa.Instr(isa.NOP)] + prog + [isa.Instr(isa.END)], 2)
        e = _same(out, what)
        assert (e[0], e[1]) == (code, 1), what


# --------------------------------------------------------------------------------------------------
# ATTN: RoPE, 4-bit KV append (weight-port writes), scores, softmax, P x V, act-quant
# --------------------------------------------------------------------------------------------------
K_OFF, V_OFF = 0x4000, 0x8000


def _attn_desc(pair, rng, at, *, Hq, Hkv, hd, vg, S, W, slots, ring, rope_mode, magic_ok=True, kv_bits=4, layer=0,
               rope_at=0x40, kconst_at=0x100, k_off=K_OFF, v_off=V_OFF):
    """Descriptor at weights0+at, RoPE words at +rope_at, key constants at +kconst_at (random scales), the
    K and V areas at k_off and v_off of every weight buffer."""
    ks = rng.uniform(0.02, 0.6, (Hkv, hd)).astype(np.float16)
    kz = rng.integers(0, 16, (Hkv, hd)).astype(np.float64)
    kc = nx.key_consts(ks, kz, hd)
    lay = memmap.kconst_layout(Hkv, hd)
    blob = bytearray(lay["_size"][0])
    for n_, (o, cnt, dt) in lay.items():
        if n_ != "_size":
            arr = np.asarray(kc[n_]).reshape(-1).astype(dt)
            blob[o:o + arr.nbytes] = arr.tobytes()
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rope = np.asarray(nx.rope_freq_words(inv), "<u4").tobytes()
    hdr = bytearray(memmap.pack_attn_header(layer=layer, heads=Hq, kv_heads=Hkv, head_dim=hd, sink=S, window=W, slots=slots,
                                            rope_mode=rope_mode, ring=ring, k_off=k_off, v_off=v_off, rope_off=at + rope_at,
                                            kconst_off=at + kconst_at, vgroup=vg, kv_bits=kv_bits))
    if not magic_ok:
        hdr[0] ^= 0xFF
    pair.upload("weights0", bytes(hdr), at)
    pair.upload("weights0", rope, at + rope_at)
    pair.upload("weights0", bytes(blob), at + kconst_at)


def _same_all(out, what):
    e = _same(out, what)
    for p_, (we, wr) in enumerate(zip(out["emu"][3], out["rtl"][3])):
        a_, b_ = np.frombuffer(we, np.uint8), np.frombuffer(wr, np.uint8)
        diff = np.nonzero(a_ != b_)[0]
        assert diff.size == 0, f"{what}: weights{p_} (KV cache) differs at {diff.size} bytes, first {diff[:8]}"
    return e


def _qkv(pair, rng, T, width, amp):
    rows = _x32_rows(rng, T, width, amp)
    rows[:, :width][rng.random((T, width)) < 0.02] = 0
    pair.upload("io", rows, 0x0)


def test_attention_ring_bit_exact(pair):
    """Λ cache (S=2, W=4, RoPE at cache positions for sinks), GQA 4/2 over both weight ports: a prefill
    block, decode steps through three ring wraps, a block that evicts inside itself; every io byte and
    the whole KV cache compared with the functional model after each run."""
    rng = np.random.default_rng(21)
    Hq, Hkv, hd, vg, S, W = 4, 2, 32, 16, 2, 4
    for p_ in range(P):       # random old cache contents (extreme value words included)
        pair.upload(f"weights{p_}", rng.integers(0, 256, 0x8000, dtype=np.uint8), 0x4000)
    _attn_desc(pair, rng, 0x2000, Hq=Hq, Hkv=Hkv, hd=hd, vg=vg, S=S, W=W, slots=S + W, ring=1,
               rope_mode=memmap.ROPE_CACHE)
    width = (Hq + 2 * Hkv) * hd
    prog = [isa.Instr(isa.ATTN, a=0xC000, b=0x0, c=0, d=0x2000), isa.Instr(isa.END)]
    runs = [(0, 3)] + [(pos, 1) for pos in range(3, 16)] + [(16, 5)]
    for pos, T in runs:
        _fresh_io(pair, rng)
        _qkv(pair, rng, T, width, 1 << 19)
        e = _same_all(pair.run(prog, T, position=pos), f"ATTN ring pos={pos} T={T}")
        assert e[0] == regmap.STATUS_OK, (pos, T, e[:2])


def test_attention_linear_and_bad_input(pair):
    """Linear cache (slot = position, RoPE at original positions), 3 KV heads (port 0 holds two), three
    value groups per record (odd: the record's zero pad), then the error codes: position past the
    cache, KV region, shape, descriptor magic."""
    rng = np.random.default_rng(22)
    Hq, Hkv, hd, vg = 6, 3, 48, 16
    _attn_desc(pair, rng, 0x2000, Hq=Hq, Hkv=Hkv, hd=hd, vg=vg, S=0, W=0, slots=8, ring=0,
               rope_mode=memmap.ROPE_ORIGINAL)
    width = (Hq + 2 * Hkv) * hd
    prog = [isa.Instr(isa.NOP), isa.Instr(isa.ATTN, a=0xC000, b=0x0, c=0, d=0x2000), isa.Instr(isa.END)]
    for pos, T in ((0, 2), (2, 1), (3, 4)):
        _fresh_io(pair, rng)
        _qkv(pair, rng, T, width, 1 << 21)
        e = _same_all(pair.run(prog, T, position=pos), f"ATTN linear pos={pos} T={T}")
        assert e[0] == regmap.STATUS_OK
    e = _same_all(pair.run(prog, 2, position=7), "linear cache: position 8 beyond 8 slots")
    assert (e[0], e[1]) == (regmap.STATUS_POSITION, 1)
    bad = {
        "slots != S + W": (dict(Hq=4, Hkv=2, hd=32, vg=16, S=2, W=4, slots=7, ring=1), regmap.STATUS_KV_REGION),
        "slots > max_context": (dict(Hq=4, Hkv=2, hd=32, vg=16, S=0, W=0, slots=CFG.max_context + 1, ring=0),
                                regmap.STATUS_KV_REGION),
        "heads not a multiple of kv heads": (dict(Hq=3, Hkv=2, hd=32, vg=16, S=2, W=4, slots=6, ring=1), regmap.STATUS_SHAPE),
        "head_dim not a multiple of 16": (dict(Hq=2, Hkv=1, hd=40, vg=20, S=2, W=4, slots=6, ring=1), regmap.STATUS_SHAPE),
        "vgroup not a multiple of 16": (dict(Hq=2, Hkv=1, hd=48, vg=24, S=2, W=4, slots=6, ring=1), regmap.STATUS_SHAPE),
        "kv_bits 8": (dict(Hq=2, Hkv=1, hd=32, vg=16, S=2, W=4, slots=6, ring=1, kv_bits=8), regmap.STATUS_SHAPE),
        "descriptor magic": (dict(Hq=2, Hkv=1, hd=32, vg=16, S=2, W=4, slots=6, ring=1, magic_ok=False),
                             regmap.STATUS_ADDR_RANGE),
    }
    for what, (kw, code) in bad.items():
        _attn_desc(pair, rng, 0x3000, rope_mode=memmap.ROPE_CACHE, **kw)
        out = pair.run([isa.Instr(isa.NOP), isa.Instr(isa.ATTN, a=0xC000, b=0x0, c=0, d=0x3000), isa.Instr(isa.END)],
                       1, position=0)
        e = _same_all(out, what)
        assert (e[0], e[1]) == (code, 1), what


# --------------------------------------------------------------------------------------------------
# ATTN.spatten: pruned tokens / heads skipped, token and head importance accumulated
# --------------------------------------------------------------------------------------------------
SPT_AT, STATE_AT = 0x3000, 0xC000


def _spatten(pair, *, layers, slots, heads, S, W, ring, state_at=STATE_AT, at=SPT_AT, magic_ok=True, **over):
    st = memmap.spatten_state_layout(slots, heads)
    f = dict(layers=layers, start_layer=0, sink=S, window=W, slots=slots, ring=ring, recent=1, heads=heads,
             kv_heads=1, state_off=state_at, **st)
    f.update(over)
    b = bytearray(memmap.pack_spatten([1 << 15] * layers, [1 << 15] * layers, **f))
    if not magic_ok:
        b[0] ^= 0xFF
    pair.upload("weights0", bytes(b), at)
    return st


def _random_state(pair, rng, st, layer, slots, heads, p_dead=0.3, heads_dead=None, state_at=STATE_AT):
    """Random importance (values near 2**63 - 1 and with the top bit set included), pruned flags of any
    byte value, into *layer*'s SpAtten state (at weights0 + state_at)."""
    base = state_at + layer * st["layer_bytes"]
    imp = rng.integers(0, 1 << 62, slots, dtype=np.int64)
    imp[rng.random(slots) < 0.2] = nx.IMP_MAX - rng.integers(0, 1 << 24, 1)[0]
    imp[0] = -5                                           # top bit set: not a value the device writes
    dead = np.where(rng.random(slots) < p_dead, rng.integers(1, 256, slots), 0).astype(np.uint8)
    himp = rng.integers(0, 1 << 62, heads, dtype=np.int64)
    himp[-1] = nx.IMP_MAX - 3
    hd_ = np.zeros(heads, np.uint8) if heads_dead is None else np.asarray(heads_dead, np.uint8)
    pair.upload("weights0", imp.astype("<i8").tobytes(), base + st["imp_off"])
    pair.upload("weights0", dead.tobytes(), base + st["dead_off"])
    pair.upload("weights0", himp.astype("<i8").tobytes(), base + st["himp_off"])
    pair.upload("weights0", hd_.tobytes(), base + st["hdead_off"])


def test_attention_spatten_bit_exact(pair):
    """ATTN.spatten on a Λ cache (S=2, W=8) through two window wraps and on a linear cache: random pruned
    tokens (sinks included) and heads (one KV head with both query heads pruned: not read), importance
    saturating at 2**63 - 1; every io byte, the KV cache and the SpAtten state compared with the functional
    model after every run; then the descriptor errors."""
    rng = np.random.default_rng(31)
    Hq, Hkv, hd, vg = 4, 2, 32, 16
    prog = [isa.Instr(isa.ATTN, flags=isa.F_SPATTEN, a=0xC000 - 0x1000, b=0x0, c=1, d=0x2000), isa.Instr(isa.END)]
    width = (Hq + 2 * Hkv) * hd
    for ring, S, W, slots, runs in ((1, 2, 8, 10, [(0, 3)] + [(p, 1) for p in range(3, 13)] + [(13, 9), (22, 1)]),
                                    (0, 2, 0, 12, [(0, 4), (4, 1), (5, 1), (6, 3), (9, 1)])):
        for p_ in range(P):
            pair.upload(f"weights{p_}", rng.integers(0, 256, 0x8000, dtype=np.uint8), 0x4000)
        _attn_desc(pair, rng, 0x2000, Hq=Hq, Hkv=Hkv, hd=hd, vg=vg, S=S, W=W, slots=slots, ring=ring,
                   rope_mode=memmap.ROPE_CACHE, layer=1, rope_at=0x80)
        pair.upload("weights0", memmap.pack_attn_ext(SPT_AT), 0x2040)
        st = _spatten(pair, layers=3, slots=slots, heads=Hq, S=S, W=W, ring=ring)
        for i, (pos, T) in enumerate(runs):
            hdead = [0, 0, 0, 0] if i % 3 == 0 else ([1, 1, 0, 0] if i % 3 == 1 else [0, 1, 0, 1])
            _random_state(pair, rng, st, 1, slots, Hq, heads_dead=hdead)
            _fresh_io(pair, rng)
            _qkv(pair, rng, T, width, 1 << 19)
            e = _same_all(pair.run(prog, T, position=pos), f"ATTN.spatten ring={ring} pos={pos} T={T}")
            assert e[0] == regmap.STATUS_OK, (ring, pos, T, e[:2])
    bad = {
        "SpAtten magic": (dict(magic_ok=False), regmap.STATUS_ADDR_RANGE),
        "layer 1 of a 1-layer descriptor": (dict(layers=1), regmap.STATUS_SHAPE),
        "slots differ": (dict(slots=11), regmap.STATUS_SHAPE),
        "unaligned state": (dict(state_at=STATE_AT + 8), regmap.STATUS_SHAPE),
        "heads beyond the head state": (dict(heads=memmap.SPATTEN_MAX_HEADS + 1), regmap.STATUS_SHAPE),
    }
    for what, (kw, code) in bad.items():
        args = dict(layers=3, slots=slots, heads=Hq, S=S, W=W, ring=0)
        args.update(kw)
        _spatten(pair, **args)
        e = _same_all(pair.run([isa.Instr(isa.NOP)] + prog, 1, position=0), what)
        assert (e[0], e[1]) == (code, 1), what


# --------------------------------------------------------------------------------------------------
# TOPK: SpAtten's cascade token / head selection over the state in weights0
# --------------------------------------------------------------------------------------------------
TK_SPT_AT, TK_STATE = 0x1000, 0x2000


def _kq(r):
    return nx.keep_q16(r) if r > 0 else 0


def _topk_spatten(pair, rng, *, L, S, W, slots, ring, R, H, start, tq, hq, flags=True, magic=memmap.MAGIC_SPT, **over):
    """SpAtten descriptor at weights0+TK_SPT_AT, its state at TK_STATE: random importances (ties, values a step
    below 2**63 - 1 that saturate the running sums) and, with *flags*, random pruned flags (any non-zero byte)."""
    lay = memmap.spatten_state_layout(slots, H)
    f = dict(layers=L, start_layer=start, sink=S, window=W, slots=slots, ring=ring, recent=R, heads=H, kv_heads=1,
             state_off=TK_STATE, **lay)
    f.update(over)
    b = bytearray(memmap.pack_spatten([_kq(r) for r in tq], [_kq(r) for r in hq], **f))
    b[0:4] = int(magic).to_bytes(4, "little")
    pair.upload("weights0", bytes(b), TK_SPT_AT)
    for li in range(L):
        base = TK_STATE + li * lay["layer_bytes"]
        imp = rng.integers(0, 1 << 24, slots).astype(np.int64)
        imp[rng.random(slots) < 0.3] = 777                                     # ties
        big = rng.random(slots) < 0.2
        imp[big] = nx.IMP_MAX - rng.integers(0, 1 << 20, int(big.sum()))        # sums saturate
        himp = rng.integers(0, 1 << 24, H).astype(np.int64)
        himp[rng.random(H) < 0.3] = nx.IMP_MAX
        pair.upload("weights0", imp.astype("<i8").tobytes(), base + lay["imp_off"])
        pair.upload("weights0", himp.astype("<i8").tobytes(), base + lay["himp_off"])
        if flags:
            dead = (rng.random(slots) < 0.2) * rng.integers(1, 256, slots)
            pair.upload("weights0", dead.astype(np.uint8), base + lay["dead_off"])
            pair.upload("weights0", (rng.random(H) < 0.25).astype(np.uint8), base + lay["hdead_off"])
    return lay


def test_topk_bit_exact(pair):
    """Λ ring (S=2, W=8, recent 1 and 2) through the window wrap, then a linear cache; start layer 0 and 1;
    keep ratios with k < alive, k >= alive, k = 0, and a head keep that leaves one head. Every io and weights
    byte (importance, flags, the bytes around them) compared with the functional model after each run;
    flags accumulate from run to run and are re-randomized every other run."""
    rng = np.random.default_rng(31)
    for p_ in range(P):
        pair.upload(f"weights{p_}", rng.integers(0, 256, 1 << 16, dtype=np.uint8))
    prog = [isa.Instr(isa.TOPK, d=TK_SPT_AT), isa.Instr(isa.END)]
    ring = dict(S=2, W=8, slots=10, ring=1, H=6, L=3)
    runs = [  # (geometry, pos, T, recent, start, token keep, head keep)
        (ring, 0, 3, 1, 0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        (ring, 3, 1, 1, 0, (0.5, 0.6, 0.5), (0.5, 0.1, 0.5)),
        (ring, 7, 2, 2, 0, (1.0, 0.5, 0.3), (1.0, 1.0, 0.1)),
        (ring, 9, 1, 1, 1, (0.0, 0.7, 0.5), (0.0, 0.5, 0.5)),
        (ring, 12, 1, 2, 0, (0.5, 0.5, 0.25), (0.3, 0.3, 0.3)),
        (ring, 15, 4, 1, 2, (0.0, 0.0, 0.5), (0.0, 0.0, 0.1)),
        (ring, 22, 1, 1, 0, (0.1, 1.0, 0.5), (0.5, 0.5, 1.0)),
        (ring, 40, 3, 2, 1, (0.0, 0.5, 0.5), (0.0, 0.5, 0.5)),
    ]
    lin = dict(S=1, W=0, slots=48, ring=0, H=5, L=2)
    runs += [(lin, 10, 4, 1, 0, (0.5, 0.3), (0.5, 0.5)),
             (lin, 44, 1, 2, 1, (0.0, 0.4), (0.0, 0.1)),
             (lin, 60, 2, 1, 0, (0.75, 0.5), (1.0, 0.5))]
    cycles = []
    for i, (g, pos, T, R, start, tq, hq) in enumerate(runs):
        _topk_spatten(pair, rng, R=R, start=start, tq=tq, hq=hq, flags=(i % 2 == 0), **g)
        out = pair.run(prog, T, position=pos)
        e = _same_all(out, f"TOPK ring={g['ring']} pos={pos} T={T}")
        assert e[0] == regmap.STATUS_OK, (pos, T, e[:2])
        cycles.append(out["rtl"][4])
    print("TOPK cycles (RTL, whole program):", cycles)


def test_topk_bad_descriptor(pair):
    """Bad SpAtten descriptors stop TOPK with emu's status code at its index."""
    rng = np.random.default_rng(32)
    g = dict(S=2, W=8, slots=10, ring=1, H=6, L=3, R=1, tq=(0.5,) * 3, hq=(0.5,) * 3)
    bad = {
        "magic": (dict(magic=0x12345678), regmap.STATUS_ADDR_RANGE),
        "start_layer >= layers": (dict(start=3), regmap.STATUS_SHAPE),
        "heads beyond max_hidden // 16": (dict(heads=memmap.spatten_max_heads(CFG.max_hidden) + 1), regmap.STATUS_SHAPE),
        "ring slots != S + W": (dict(slots=11), regmap.STATUS_SHAPE),
        "importance offset not 64-byte aligned": (dict(imp_off=8), regmap.STATUS_SHAPE),
    }
    prog = [isa.Instr(isa.NOP), isa.Instr(isa.TOPK, d=TK_SPT_AT), isa.Instr(isa.END)]
    for what, (kw, code) in bad.items():
        kw = dict(kw)
        args = dict(g, start=kw.pop("start", 0))
        if "slots" in kw:
            args["slots"] = kw.pop("slots")
        _topk_spatten(pair, rng, **args, **kw)
        e = _same_all(pair.run(prog, 1, position=20), what)
        assert (e[0], e[1]) == (code, 1), what
