"""cocotb bench of the attention flow (hw.rtl.attention.AttentionCore): scores from 4-bit keys,
softmax, P x dequantized 4-bit values — identical to the ATTN arithmetic of hw/numerics.py and
sim/emu.py (random heads, the rope-cache sink remap, one kept token, equal scores)."""
import random

import cocotb
import numpy as np

from hw import numerics as nx
from sim.tb.sfu.streams import Stream, pulse, reset


def reference(q, q2, ns, KM, KZ, ksh, kcodes, vcodes, vwords, vg):
    qf = nx.rshift_round(q * KM, 16)
    d = kcodes - KZ
    sc = d @ qf
    if q2 is not None and ns:
        sc[:ns] = d[:ns] @ nx.rshift_round(q2 * KM, 16)
    s = nx.shift_sat32(sc, ksh - 16)
    p = nx.softmax_q24(s)
    vhat = nx.value_dequant(vcodes, vwords, vg)
    return nx.sat(nx.rshift_round(p @ vhat, 24), 32)


def pack(elems, bits: int, lanes: int) -> list[int]:
    """[n, hd] elements -> n * hd / lanes items, channel c + i of an item in bits i*bits.."""
    out = []
    for row in np.asarray(elems, dtype=object).reshape(-1, lanes):
        out.append(sum(int(v) << (bits * i) for i, v in enumerate(row)))
    return out


async def head(dut, rng, n, hd, vg, ns=0, remap=False, const_keys=False, seed=0):
    ks = (rng.random(hd) * 0.2 + 1e-3).astype(np.float16)
    kz = rng.integers(0, 16, hd).astype(np.float64)
    kc = nx.key_consts(ks[None, :], kz[None, :], hd)
    KM, KZ, ksh = kc["KM"][0], kc["KZ"][0], int(kc["KSH"][0])
    q = rng.integers(-(1 << 22), 1 << 22, hd)
    q2 = rng.integers(-(1 << 22), 1 << 22, hd) if remap else None
    kcodes = np.tile(rng.integers(0, 16, hd), (n, 1)) if const_keys else rng.integers(0, 16, (n, hd))
    vals = rng.integers(-(1 << 20), 1 << 20, (n, hd))
    vcodes, vwords = nx.value_quant(vals, vg)
    want = reference(q, q2, ns, KM, KZ, ksh, kcodes, vcodes, vwords, vg)
    await pulse(dut, n=n, ns=ns, remap=int(remap), hd=hd, ksh=ksh & 0xFF)
    cw = KM | (KZ << 16)
    qs = np.concatenate([q, q2]) if remap else q
    cs = np.concatenate([cw, cw]) if remap else cw
    r = random.Random(seed)
    cocotb.start_soon(Stream(dut, "q").send(qs, r, 0.8))
    cocotb.start_soon(Stream(dut, "c", 20).send(cs, random.Random(seed + 1), 0.8))
    L = len(dut.k__payload.value) // 4                  # channels per item (the core's lanes)
    cocotb.start_soon(Stream(dut, "k", 4 * L).send(pack(kcodes, 4, L), random.Random(seed + 2), 0.8))
    wrep = np.repeat(vwords & 0xFFFFFFFF, vg, axis=1)
    cocotb.start_soon(Stream(dut, "v", 36 * L).send(pack(vcodes | (wrep << 4), 36, L), random.Random(seed + 3), 0.8))
    got = np.array(await Stream(dut, "o").recv(hd, random.Random(seed + 4), 0.8, limit=20 * n * hd + 2000))
    bad = np.nonzero(got != want)[0]
    assert not len(bad), f"n={n} hd={hd}: {len(bad)} mismatches, first {bad[0]}: {got[bad[0]]} != {want[bad[0]]}"


@cocotb.test()
async def attention_heads(dut):
    await reset(dut)
    rng = np.random.default_rng(21)
    await head(dut, rng, 12, 64, 32, seed=1)
    await head(dut, rng, 1, 64, 64, seed=2)                       # a single kept token
    await head(dut, rng, 20, 32, 32, ns=4, remap=True, seed=3)    # sinks use the remapped query
    await head(dut, rng, 9, 64, 16, const_keys=True, seed=4)      # equal scores
    await head(dut, rng, 40, 16, 16, seed=5)
