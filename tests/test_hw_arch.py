"""ISA encode/decode/disassembly, numerics edge cases against float references, memmap packing."""
from __future__ import annotations

import numpy as np
import pytest

from algo.common import AccllmError
from hw import isa
from hw import memmap as mm
from hw import numerics as nx


def test_isa_roundtrip_and_rejects():
    rng = np.random.default_rng(0)
    for op, spec in isa.OPS.items():
        for _ in range(20):
            f = {k: int(rng.integers(0, 1 << (16 if k == "c" else 32))) if k in spec.fields else 0 for k in "abcd"}
            ins = isa.Instr(op, flags=int(rng.integers(0, 256)) & spec.flags, **f)
            w = isa.encode(ins)
            assert len(w) == 16 and isa.decode(w) == ins
    with pytest.raises(AccllmError):
        isa.encode(isa.Instr(0x7E))
    with pytest.raises(AccllmError):
        isa.encode(isa.Instr(isa.END, a=1))
    with pytest.raises(AccllmError):
        isa.encode(isa.Instr(isa.MATMUL, flags=0x80))
    with pytest.raises(isa.DecodeError) as e:
        isa.decode(bytes([0x7E]) + bytes(15), 9)
    assert e.value.index == 9
    with pytest.raises(AccllmError, match="multiple"):
        isa.decode_program(bytes(17))
    text = isa.disassemble(isa.encode(isa.Instr(isa.MATMUL, a=1, b=2, c=3, d=4, flags=isa.F_ACC)) + bytes([0x7E]) + bytes(15))
    assert "matmul.acc" in text and "<illegal" in text


def test_rounding_helpers():
    assert list(nx.rshift_round(np.array([5, -5, 6, -6, 7, -7]), 1)) == [3, -2, 3, -3, 4, -3]  # half up
    assert nx.shift_sat32(np.array([1 << 40]), 0)[0] == nx.I32_MAX
    assert nx.shift_sat32(np.array([-3]), -31)[0] == nx.I32_MIN
    assert list(nx.bitlen(np.array([0, 1, 255, 256, (1 << 62) - 1]))) == [0, 1, 8, 9, 62]
    v = np.array([0, 1, 15, 16, 10 ** 12, (1 << 62) - 1])
    s = nx.isqrt(v)
    assert np.all(s * s <= v) and np.all((s + 1) * (s + 1) > v)


def test_fp16_parts_exact():
    x = np.array([0.0, 1.0, -2.5, 6e-8, 65504.0, 1e-4], np.float16)
    m, e = nx.fp16_parts(x)
    assert np.array_equal(m * 2.0 ** e, x.astype(np.float64))


@pytest.mark.parametrize("scale_bits", [8, 16])
def test_scales_to_hw_precision(scale_bits):
    rng = np.random.default_rng(1)
    s = (rng.random((50, 8)) ** 3 * 0.1 + 1e-6).astype(np.float16)
    M, SH = nx.scales_to_hw(s, scale_bits)
    assert M.max() < 1 << scale_bits and M.max(axis=1).min() >= 1 << (scale_bits - 1)
    hwv = M * 2.0 ** -SH[:, None]
    err = np.abs(hwv - s.astype(np.float64) / 127) / (s.astype(np.float64).max(axis=1, keepdims=True) / 127)
    assert err.max() <= 2.0 ** -(scale_bits - 1)


def test_act_quant_and_matmul_vs_float():
    rng = np.random.default_rng(2)
    v = (rng.standard_normal((4, 256)) * 5 * 65536).astype(np.int64)
    v[1] = 0                                               # an all-zero row
    v[2, 0] = (1 << 31) - 1                                # a huge value
    codes, words = nx.act_quant(v)
    assert np.abs(codes).max() <= 127 and not codes[1].any()
    deq = nx.act_dequant(codes, words)
    amax = np.abs(v).max(axis=1, keepdims=True) / 65536
    assert np.all(np.abs(deq - v / 65536) <= amax / 127 * 0.5 + 1e-9 + amax * 2.0 ** -14)
    N, K, g = 16, 256, 64
    for bits in (2, 4, 8):
        c = rng.integers(0, 1 << bits, (N, K))
        z = rng.integers(0, 1 << bits, (N, K // g))
        s = (rng.random((N, K // g)) * 0.01 + 1e-3).astype(np.float16)
        M, SH = nx.scales_to_hw(s, 16)
        y = nx.matmul(codes, words, c, z, M, SH, g)
        W = (c - np.repeat(z, g, 1)) * np.repeat(s.astype(np.float64), g, 1)
        ref = np.clip(deq @ W.T, -32768, 32767.99999)      # int32 Q16.16 saturates (row 2 is huge)
        assert np.abs(y / 65536 - ref).max() <= 1e-4 * np.abs(ref).max() + 2e-5
    # 2:4 mask: pruned positions contribute exactly nothing
    mask = np.zeros((N, K), bool)
    mask[:, ::2] = True
    y1 = nx.matmul(codes, words, c, z, M, SH, g, mask)
    y2 = nx.matmul(codes, words, np.where(mask, c, np.repeat(z, g, 1)), z, M, SH, g)
    assert np.array_equal(y1, y2)


def test_sfu_against_float():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 64)) * 2 * 65536).astype(np.int64)
    x[1] = 0                                               # RMSNorm of zeros -> zeros, no fault
    gam = nx.fp16_to_q16(np.full(64, 1.5, np.float16))
    y = nx.rmsnorm(x, gam, int(round(1e-5 * 2 ** 40)))
    xf = x / 65536
    ref = xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-5) * 1.5
    assert np.abs(y / 65536 - ref).max() < 1e-4 and not y[1].any()
    g = np.linspace(-20, 20, 401)
    u = np.ones_like(g)
    out = nx.silu_mul((g * 65536).astype(np.int64), (u * 65536).astype(np.int64)) / 65536
    assert np.abs(out - g / (1 + np.exp(-g))).max() < 2e-4
    # softmax: equal scores -> uniform; huge negative -> 0; sums to 1
    p = nx.softmax_q24(np.zeros(7, np.int64))
    assert np.abs(p - 2 ** 24 / 7).max() <= 1
    p = nx.softmax_q24(np.array([0, -(1 << 30), -(40 << 16)], np.int64))
    assert p[0] == 1 << 24 and p[1] == 0
    s = (rng.standard_normal(100) * 4 * 65536).astype(np.int64)
    p = nx.softmax_q24(s)
    ref = np.exp2(s / 65536)
    assert np.abs(p / 2 ** 24 - ref / ref.sum()).max() < 1e-6


def test_rope_and_kv_quant():
    rng = np.random.default_rng(4)
    hd = 32
    inv = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
    F = nx.rope_freq_words(inv)
    x = (rng.standard_normal((2, hd)) * 65536).astype(np.int64)
    for pos in (0, 7, 5000, 10 ** 7):
        C, S = nx.rope_cos_sin(np.array(pos), F)
        y = nx.rope(x, C, S)
        ang = pos * inv
        x1, x2 = x[:, :hd // 2] / 65536, x[:, hd // 2:] / 65536
        ref = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], 1)
        tol = 1e-4 if pos < 10 ** 6 else 2e-2          # DDS phase rounding grows with the position
        assert np.abs(y / 65536 - ref).max() < tol
    v = (rng.standard_normal((5, hd)) * 65536).astype(np.int64)
    q, w = nx.value_quant(v, 16)
    assert q.min() >= 0 and q.max() <= 15
    vh = nx.value_dequant(q, w, 16)
    r = (np.maximum(v.reshape(5, 2, 16).max(-1), 0) - np.minimum(v.reshape(5, 2, 16).min(-1), 0))
    assert np.all(np.abs(vh - v).reshape(5, 2, 16).max(-1) <= r / 15 * 0.51 + 2 * r / 15 / 2 ** 14 + 2)
    ks = np.full((1, hd), 0.05, np.float16)
    kz = np.full((1, hd), 8.0)
    kc = nx.key_consts(ks, kz, hd)
    k = (rng.standard_normal(hd) * 0.2 * 65536).astype(np.int64)
    kq = nx.key_quant(k, kc["RK"][0], kc["KS"][0], kc["KZ"][0])
    ref = np.clip(np.round(k / 65536 / ks[0].astype(np.float64)) + 8, 0, 15)
    assert np.abs(kq - ref).max() <= 1 and (kq == ref).mean() > 0.9


@pytest.mark.parametrize("sparse,bits,scale_bits", [(False, 2, 8), (True, 2, 8), (False, 8, 16), (True, 4, 16)])
def test_linear_pack_roundtrip(sparse, bits, scale_bits):
    from quant.pack import encode_24
    rng = np.random.default_rng(5)
    N, K, g = 21, 128, 32
    codes = rng.integers(0, 1 << bits, (N, K))
    zeros = rng.integers(0, 1 << bits, (N, K // g))
    M = rng.integers(0, 1 << scale_bits, (N, K // g))
    SH = rng.integers(-64, 64, N)
    if sparse:
        mask = np.zeros((N, K), bool)
        sel = rng.integers(0, 6, (N, K // 4))
        from quant.pack import PATTERNS_24
        for j, (a, b) in enumerate(PATTERNS_24):
            r, q = np.nonzero(sel == j)
            mask[r, 4 * q + a] = mask[r, 4 * q + b] = True
        kept, idx = encode_24(codes, mask)
        imgs = mm.pack_linear(kept, zeros, M, SH, bits, g, idx=idx, scale_bits=scale_bits, ports=4)
    else:
        imgs = mm.pack_linear(codes, zeros, M, SH, bits, g, scale_bits=scale_bits, ports=4)
    assert len({len(b) for b in imgs}) == 1 and all(len(b) % 64 == 0 for b in imgs)
    u = mm.unpack_linear(imgs)
    assert np.array_equal(u["zeros"], zeros) and np.array_equal(u["M"], M) and np.array_equal(u["SH"], SH)
    if sparse:
        assert np.array_equal(u["mask"], mask) and np.array_equal(u["codes"][mask], codes[mask])
    else:
        assert np.array_equal(u["codes"], codes)
    with pytest.raises(AccllmError):
        mm.pack_linear(codes, zeros, M, SH, 3, g)


def test_memmap_strides():
    assert mm.stride32(576) == 2304 and mm.stride8(576) == 64 + 576 and mm.stride8(100) == 64 + 128


def test_disasm_cli(tmp_path, capsys):
    from host.cli import main
    prog = isa.encode_program([isa.Instr(isa.EMBED, a=64, b=0, c=8, d=0), isa.Instr(isa.END)])
    (tmp_path / "program.bin").write_bytes(prog)
    assert main(["disasm", str(tmp_path / "program.bin")]) == 0
    out = capsys.readouterr().out
    assert "embed" in out and "end" in out
    (tmp_path / "t.bin").write_bytes(prog[:20])
    assert main(["disasm", str(tmp_path / "t.bin")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert main(["bench", "nosuchbackend"]) == 2
