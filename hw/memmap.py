"""HBM memory map of a compiled model and the runtime protocol (what ``memmap.json`` says).

Buffers (one per pointer argument of hw/regmap.py):

* ``program``  (m_axi_ctrl, bank 0): program.bin — the decode program at instruction 0, then one
  prefill program per length bucket. The runtime sets ``entry`` (first instruction index) and
  ``program_len`` (index one past the program's END).
* ``io``       (m_axi_ctrl, bank 0): token ids in, logits / argmax out, activation scratch.
* ``kv``       (m_axi_ctrl, bank 1): reserved in v1 (64 bytes); the KV cache is in the weight buffers.
* ``weights<p>`` (m_axi_w<p>, bank p): file ``hbm_w<p>.bin``. Every port holds the same layout
  ("lockstep" area: for every linear layer / the embedding a 64-byte descriptor and the port's slice of
  rows, at the same offset on every port), then the port's stripe of the KV cache (KV head h on port
  h % P, zero-initialised, :func:`kv_layout` per port), then, on port 0 only, the constants area
  (RMSNorm gammas, attention descriptors, RoPE frequency words, KV-quantization constants).

All offsets in instructions and descriptors are byte offsets relative to the start of the buffer the
operand lives in; every region is 64-byte aligned (one 512-bit beat).

Runtime protocol (per run): write the token ids (int32) at ``io.tokens_in``; set every pointer
argument to its buffer, ``entry``/``program_len`` of the entry point, ``position`` (position of the
first token), ``n_tokens`` (1 for decode, <= bucket for prefill: ``prefill_partial`` is true),
``flags`` (bit 0: logits of every token of the run at ``io.logits_out``, row stride ``count`` int32
Q16.16 values — float = raw * ``scale``; bit 1: argmax token of the last token at ``io.argmax_out``);
start; wait for ap_done; status (bits 7:0) 0 = ok, else the code and the failing instruction (31:8).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from algo.common import AccllmError

ALIGN = 64
SEC_ALIGN = 16           # every section of a row record starts at a multiple of 16 bytes
FORMAT = "accllm-memmap"
VERSION = 2              # 2: row-record sections padded to SEC_ALIGN bytes

MAGIC_LIN = 0x314E494C   # 'LIN1'
MAGIC_EMB = 0x31424D45   # 'EMB1'
MAGIC_NRM = 0x314D524E   # 'NRM1'
MAGIC_ATN = 0x314E5441   # 'ATN1'
MAGIC_SPT = 0x31545053   # 'SPT1'


def align(n: int, a: int = ALIGN) -> int:
    return (int(n) + a - 1) // a * a


def stride32(d: int) -> int:
    """Row stride of X32 activations (int32 Q16.16) of width d."""
    return align(4 * d)


def stride8(d: int) -> int:
    """Row stride of X8 activations: 64-byte row header (scale word in bytes 0..3), codes at +64."""
    return ALIGN + align(d)


def pack_bits_np(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (rows x count) packed LSB-first per row (each row starts at a byte)."""
    c = np.asarray(codes, dtype=np.uint8)
    rows, n = c.shape
    if bits == 8:
        return c.copy()
    bm = ((c[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, n * bits)
    return np.packbits(bm, axis=1, bitorder="little")


def unpack_bits_np(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    d = np.asarray(data, dtype=np.uint8)
    if bits == 8:
        return d[:, :n].copy()
    bm = np.unpackbits(d, axis=1, bitorder="little")[:, :n * bits].reshape(d.shape[0], n, bits)
    return (bm << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint16).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# linear layers: descriptor + per-row records, rows split over the weight ports
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowRecord:
    """Byte layout of one output row's record (records of a port's rows are back to back).

    [shift int8][scales: ngroups x scale_bits/8 bytes, little-endian][zeros: ngroups b-bit codes,
    LSB-first, ceil(ngroups*b/8) bytes][2:4 pattern indices: K/4 3-bit, LSB-first (sparse only)]
    [codes: K (dense) or K/2 (2:4, kept codes in ascending column order) b-bit, LSB-first].
    Every section is zero-padded to a multiple of SEC_ALIGN bytes (so records are too): the matrix
    engine's byte gearbox then realigns sections in 16-byte steps instead of byte steps (an 8:1
    instead of a 128:1 multiplexer per bit of a 512-bit port). The ``*_bytes`` properties are the
    unpadded section contents; ``sections()`` gives the padded sizes.
    Metadata comes first so that the matrix engine has scales and zeros before the codes stream in.
    """
    K: int
    bits: int
    group: int
    sparse: bool
    scale_bits: int

    @property
    def ngroups(self) -> int:
        return self.K // self.group

    @property
    def scale_bytes(self) -> int:
        return self.ngroups * (2 if self.scale_bits > 8 else 1)

    @property
    def zero_bytes(self) -> int:
        return (self.ngroups * self.bits + 7) // 8

    @property
    def idx_bytes(self) -> int:
        return (self.K // 4 * 3 + 7) // 8 if self.sparse else 0

    @property
    def code_bytes(self) -> int:
        n = self.K // 2 if self.sparse else self.K
        return (n * self.bits + 7) // 8

    def sections(self) -> dict[str, int]:
        """Padded byte size of every section, in record order (idx is 0 for dense layers)."""
        raw = {"shift": 1, "scales": self.scale_bytes, "zeros": self.zero_bytes, "idx": self.idx_bytes,
               "codes": self.code_bytes}
        return {k: align(v, SEC_ALIGN) for k, v in raw.items()}

    @property
    def size(self) -> int:
        return sum(self.sections().values())

    def offsets(self) -> dict[str, int]:
        o, at = {}, 0
        for k, v in self.sections().items():
            o[k] = at
            at += v
        return o


def check_linear(N: int, K: int, bits: int, group: int, sparse: bool) -> None:
    if bits not in (2, 4, 8):
        raise AccllmError(f"the matrix engine takes 2, 4 or 8-bit weight codes, got {bits}")
    if group <= 0 or K % group or group % 4:
        raise AccllmError(f"K={K} must be a multiple of the group {group} (a multiple of 4)")
    if group > 128:
        raise AccllmError(f"group {group} > 128: the group-sum width bound of docs/numerics.md needs g <= 128")
    if N <= 0 or K <= 0:
        raise AccllmError(f"bad linear shape N={N} K={K}")


LIN_HEADER = struct.Struct("<IIIIBBHIIIIII20x")   # 64 bytes


def linear_header(N: int, K: int, rows_per_port: int, bits: int, sparse: bool, group: int,
                  scale_bits: int, port: int, ports: int) -> bytes:
    rec = RowRecord(K, bits, group, sparse, scale_bits)
    return LIN_HEADER.pack(MAGIC_LIN, N, K, rows_per_port, bits, int(sparse), group, scale_bits,
                           rec.size, port, ports, ALIGN, ALIGN + rows_per_port * rec.size)


def parse_linear_header(b: bytes) -> dict:
    if len(b) < 64:
        raise AccllmError("linear descriptor truncated")
    (magic, N, K, rpp, bits, sparse, group, scale_bits, rec, port, ports, data_off, end) = LIN_HEADER.unpack(b[:64])
    if magic != MAGIC_LIN:
        raise AccllmError(f"not a linear descriptor (magic 0x{magic:08x})")
    return dict(N=N, K=K, rows_per_port=rpp, bits=bits, sparse=bool(sparse), group=group, scale_bits=scale_bits,
                record=rec, port=port, ports=ports, data_off=data_off, size=end)


def linear_port_bytes(N: int, K: int, bits: int, group: int, sparse: bool, scale_bits: int, ports: int) -> int:
    rpp = -(-N // ports)
    return align(ALIGN + rpp * RowRecord(K, bits, group, sparse, scale_bits).size)


def pack_linear(codes, zeros, M, SH, bits: int, group: int, idx=None, scale_bits: int = 16,
                ports: int = 1) -> list[bytes]:
    """Per-port images of one linear layer.

    codes [N, K] (dense, pruned positions ignored) or [N, K/2] (2:4 kept codes) unsigned b-bit;
    idx [N, K/4] pattern indices 0..5 (2:4 only); zeros [N, K/g]; M [N, K/g] scale mantissas;
    SH [N] row shifts (hw.numerics.scales_to_hw). Rows are split contiguously: port p holds rows
    [p*R, (p+1)*R), R = ceil(N / ports); missing rows are padded with zero records (output 0).
    """
    sparse = idx is not None
    codes = np.asarray(codes)
    N = codes.shape[0]
    K = codes.shape[1] * (2 if sparse else 1)
    check_linear(N, K, bits, group, sparse)
    rec = RowRecord(K, bits, group, sparse, scale_bits)
    R = -(-N // ports)
    pad = R * ports - N

    def padrows(a):
        a = np.asarray(a)
        return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a

    if np.any(np.asarray(M) >= (1 << scale_bits)) or np.any(np.asarray(M) < 0):
        raise AccllmError(f"scale mantissas do not fit {scale_bits} bits")
    parts = [padrows(np.asarray(SH, np.int64)).astype(np.int8).view(np.uint8)[:, None]]
    Mp = padrows(np.asarray(M, np.int64))
    parts.append((Mp.astype("<u2").view(np.uint8) if scale_bits > 8 else Mp.astype(np.uint8)).reshape(R * ports, -1))
    parts.append(pack_bits_np(padrows(zeros), bits))
    if sparse:
        parts.append(pack_bits_np(padrows(idx), 3))
    parts.append(pack_bits_np(padrows(codes), bits))
    parts = [np.pad(a, ((0, 0), (0, align(a.shape[1], SEC_ALIGN) - a.shape[1]))) for a in parts]
    recs = np.concatenate(parts, axis=1)
    assert recs.shape[1] == rec.size, (recs.shape, rec.size)
    out = []
    for p in range(ports):
        body = recs[p * R:(p + 1) * R].tobytes()
        img = linear_header(N, K, R, bits, sparse, group, scale_bits, p, ports) + body
        out.append(img + bytes(align(len(img)) - len(img)))
    return out


def unpack_linear(port_images: list[bytes | np.ndarray]) -> dict:
    """Inverse of :func:`pack_linear` (the functional model's weight decoder): dict with N, K, bits,
    group, sparse, codes (dense [N, K], 0 at pruned positions), mask ([N, K] bool or None),
    zeros [N, K/g], M [N, K/g], SH [N]."""
    port_images = [np.frombuffer(img, dtype=np.uint8) if isinstance(img, (bytes, bytearray)) else
                   np.asarray(img, dtype=np.uint8) for img in port_images]
    heads = [parse_linear_header(img[:64].tobytes()) for img in port_images]
    h = heads[0]
    N, K, R, bits, group, sparse = h["N"], h["K"], h["rows_per_port"], h["bits"], h["group"], h["sparse"]
    rec = RowRecord(K, bits, group, sparse, h["scale_bits"])
    if h["record"] != rec.size or len(heads) != h["ports"]:
        raise AccllmError("linear descriptor inconsistent with its record layout or port count")
    rows = []
    for img in port_images:
        a = img[:h["size"]]
        if a.size < h["size"]:
            raise AccllmError("linear layer image truncated")
        rows.append(a[ALIGN:ALIGN + R * rec.size].reshape(R, rec.size))
    recs = np.concatenate(rows)[:N]
    o = rec.offsets()
    ng = rec.ngroups
    SH = recs[:, 0].view(np.int8).astype(np.int64)
    sec = {k: recs[:, o[k]:o[k] + n] for k, n in (("scales", rec.scale_bytes), ("zeros", rec.zero_bytes),
                                                   ("idx", rec.idx_bytes), ("codes", rec.code_bytes))}
    M = (sec["scales"].copy().view("<u2") if h["scale_bits"] > 8 else sec["scales"]).astype(np.int64)
    zeros = unpack_bits_np(sec["zeros"], bits, ng).astype(np.int64)
    if sparse:
        from quant.pack import PATTERNS_24
        pidx = unpack_bits_np(sec["idx"], 3, K // 4).astype(np.int64)
        if pidx.max(initial=0) > 5:
            raise AccllmError("2:4 pattern index > 5 in a weight record")
        kept = unpack_bits_np(sec["codes"], bits, K // 2).astype(np.int64)
        pat = np.asarray(PATTERNS_24, dtype=np.int64)                  # [6, 2]
        cols = pat[pidx] + (np.arange(K // 4) * 4)[None, :, None]      # [N, K/4, 2]
        codes = np.zeros((N, K), np.int64)
        mask = np.zeros((N, K), bool)
        r = np.arange(N)[:, None, None]
        codes[r, cols] = kept.reshape(N, K // 4, 2)
        mask[r, cols] = True
    else:
        codes = unpack_bits_np(sec["codes"], bits, K).astype(np.int64)
        mask = None
    return dict(N=N, K=K, bits=bits, group=group, sparse=sparse, codes=codes, mask=mask, zeros=zeros, M=M, SH=SH)


# --------------------------------------------------------------------------------------------------
# embedding table: descriptor + the port's slice of rows, int32 Q16.16
# --------------------------------------------------------------------------------------------------
EMB_HEADER = struct.Struct("<IIIIII40x")


def pack_embedding(table_q16: np.ndarray, ports: int) -> list[bytes]:
    V, D = table_q16.shape
    R = -(-V // ports)
    t = np.zeros((R * ports, D), np.int32)
    t[:V] = table_q16
    return [EMB_HEADER.pack(MAGIC_EMB, V, D, R, p, ports) + t[p * R:(p + 1) * R].astype("<i4").tobytes()
            for p in range(ports)]


def parse_embedding_header(b: bytes) -> dict:
    magic, V, D, R, port, ports = EMB_HEADER.unpack(b[:64])
    if magic != MAGIC_EMB:
        raise AccllmError(f"not an embedding descriptor (magic 0x{magic:08x})")
    return dict(V=V, D=D, rows_per_port=R, port=port, ports=ports, size=64 + R * D * 4)


# --------------------------------------------------------------------------------------------------
# constants on port 0: RMSNorm and attention descriptors
# --------------------------------------------------------------------------------------------------
NRM_HEADER = struct.Struct("<IIQ48x")     # magic, D, eps * 2**40 (rounded); gamma int32 Q16.16 [D] follows


def pack_norm(gamma_q16: np.ndarray, eps: float) -> bytes:
    D = gamma_q16.shape[0]
    e40 = int(round(eps * 2.0 ** 40))
    return NRM_HEADER.pack(MAGIC_NRM, D, e40) + np.asarray(gamma_q16, "<i4").tobytes()


def parse_norm(b: np.ndarray) -> tuple[int, int, np.ndarray]:
    magic, D, e40 = NRM_HEADER.unpack(bytes(b[:64]))
    if magic != MAGIC_NRM:
        raise AccllmError(f"not an RMSNorm descriptor (magic 0x{magic:08x})")
    return D, e40, b[64:64 + 4 * D].view("<i4").astype(np.int64)


ATN_FIELDS = ("magic", "layer", "heads", "kv_heads", "head_dim", "sink", "window", "slots", "rope_mode",
              "ring", "k_off", "v_off", "rope_off", "kconst_off", "vgroup", "kv_bits")
ATN_HEADER = struct.Struct("<" + "I" * 16)
ROPE_ORIGINAL, ROPE_CACHE = 0, 1
# ring: 1 = Λ ring buffer (S sink slots + W window slots, unbounded positions), 0 = linear cache
# (slot = position; a position >= slots stops with STATUS_POSITION)


def pack_attn_header(**f) -> bytes:
    f = dict(f, magic=MAGIC_ATN)
    return ATN_HEADER.pack(*(int(f[k]) for k in ATN_FIELDS))


def parse_attn_header(b: bytes) -> dict:
    d = dict(zip(ATN_FIELDS, ATN_HEADER.unpack(bytes(b[:64]))))
    if d["magic"] != MAGIC_ATN:
        raise AccllmError(f"not an attention descriptor (magic 0x{d['magic']:08x})")
    return d


# Attention descriptor, second 64 bytes (words 16..31): word 16 = offset of the layer's SpAtten
# descriptor in weights0 (read only by ATTN with flag spatten), the rest zero.
ATN_EXT = struct.Struct("<" + "I" * 16)


def pack_attn_ext(spatten_off: int = 0) -> bytes:
    return ATN_EXT.pack(int(spatten_off), *([0] * 15))


def parse_attn_ext(b: bytes) -> dict:
    w = ATN_EXT.unpack(bytes(b[:64]))
    return {"spatten_off": w[0]}


# SpAtten descriptor (weights0): a 64-byte header, then token_keep_q[layers] and head_keep_q[layers]
# (u32, Q0.16 keep ratios; 0 for layers before start_layer). The state it points at (writable, in weights0)
# is per layer at state_off + l * layer_bytes: token importance [slots] (u64, saturating at 2**63 - 1),
# token pruned flags [slots] (u8), head importance [heads] (u64), head pruned flags [heads] (u8), each part
# 64-byte aligned at the relative offsets below (spatten_state_layout). ``sink``: the first positions SpAtten
# never prunes (the recipe's sink_tokens; under Λ, ring = 1, also the ring's S sink slots); ``window``/``slots``/
# ``ring``: the cache geometry (slot -> position); ``recent``: the newest tokens never pruned.
SPT_FIELDS = ("magic", "layers", "start_layer", "sink", "window", "slots", "ring", "recent", "heads", "kv_heads",
              "state_off", "layer_bytes", "imp_off", "dead_off", "himp_off", "hdead_off")
SPT_HEADER = struct.Struct("<" + "I" * 16)


SPATTEN_MAX_HEADS = 128   # query heads the kernel's SpAtten head state holds (hw/rtl/attn_unit.py)


def spatten_state_layout(slots: int, heads: int) -> dict:
    imp = 0
    dead = align(imp + 8 * slots)
    himp = align(dead + slots)
    hdead = align(himp + 8 * heads)
    return dict(imp_off=imp, dead_off=dead, himp_off=himp, hdead_off=hdead, layer_bytes=align(hdead + heads))


def spatten_max_heads(max_hidden: int) -> int:
    """Query heads a SpAtten descriptor may have (the on-chip head state of the ATTN and TOPK units):
    SPATTEN_MAX_HEADS, and heads * head_dim <= max_hidden with head_dim >= 16 (the attention unit's smallest)."""
    return min(SPATTEN_MAX_HEADS, max_hidden // 16)


def pack_spatten(token_keep_q: list[int], head_keep_q: list[int], **f) -> bytes:
    f = dict(f, magic=MAGIC_SPT)
    L = int(f["layers"])
    if len(token_keep_q) != L or len(head_keep_q) != L:
        raise AccllmError(f"SpAtten descriptor needs {L} keep numerators per kind")
    body = np.asarray(list(token_keep_q) + list(head_keep_q), "<u4").tobytes()
    return SPT_HEADER.pack(*(int(f[k]) for k in SPT_FIELDS)) + body


def parse_spatten(b) -> dict:
    """The SpAtten descriptor at the start of *b* (header + the keep arrays)."""
    b = bytes(b)
    d = dict(zip(SPT_FIELDS, SPT_HEADER.unpack(b[:64])))
    if d["magic"] != MAGIC_SPT:
        raise AccllmError(f"not a SpAtten descriptor (magic 0x{d['magic']:08x})")
    L = d["layers"]
    arr = np.frombuffer(b[64:64 + 8 * L], "<u4").astype(np.int64)
    if arr.size != 2 * L:
        raise AccllmError("SpAtten descriptor truncated (keep arrays)")
    d["token_keep_q"], d["head_keep_q"] = arr[:L], arr[L:]
    return d


def spatten_bytes(layers: int) -> int:
    return 64 + 8 * layers


def kconst_layout(kv_heads: int, head_dim: int) -> dict[str, tuple[int, int, str]]:
    """Key-quantization constants of one layer (port 0, at the descriptor's kconst_off):
    name -> (offset, count, numpy dtype). RK/KS: quantize-on-append reciprocal mantissa and shift;
    KZ: zero points; KM/KSH: score-side scale mantissa [Hkv, hd] and shift per kv head."""
    n = kv_heads * head_dim
    out, o = {}, 0
    for name, cnt, dt in (("RK", n, "<u4"), ("KS", n, "u1"), ("KZ", n, "u1"), ("KM", n, "<u2"), ("KSH", kv_heads, "i1")):
        out[name] = (o, cnt, dt)
        o = align(o + cnt * np.dtype(dt).itemsize)
    out["_size"] = (o, 0, "u1")
    return out


def v_words_bytes(head_dim: int, vgroup: int) -> int:
    """Bytes of a V record's group words: 4 per group, padded to a multiple of 8."""
    return -(-(head_dim // vgroup) // 2) * 8


def kv_layout(layers: int, kv_heads: int, head_dim: int, slots: int, vgroup: int, kv_bits: int = 4) -> dict:
    """The KV region: per layer a K area [kv_heads][slots][head_dim 4-bit codes, LSB-first] and a V
    area [kv_heads][slots][record: one 32-bit word per group of vgroup channels (vm bits 15:0 | vsh
    int8 bits 23:16 | zero bits 27:24), zero-padded to a multiple of 8 bytes, then head_dim 4-bit codes,
    LSB-first]. The words come first so the attention unit can dequantize the codes as they stream in;
    the padding keeps the codes on the 8-byte items it reads (16 codes per cycle)."""
    if kv_bits != 4:
        raise AccllmError(f"the KV-cache unit stores 4-bit codes; kv_bits={kv_bits} is not supported by the hardware")
    k_slot = head_dim * kv_bits // 8
    v_slot = head_dim * kv_bits // 8 + v_words_bytes(head_dim, vgroup)
    k_bytes = align(kv_heads * slots * k_slot)
    v_bytes = align(kv_heads * slots * v_slot)
    per_layer = k_bytes + v_bytes
    return dict(k_slot=k_slot, v_slot=v_slot, k_bytes=k_bytes, v_bytes=v_bytes, per_layer=per_layer,
                total=align(max(per_layer * layers, ALIGN)),
                layers=[dict(k_off=i * per_layer, v_off=i * per_layer + k_bytes) for i in range(layers)])


def validate_memmap(d: dict) -> None:
    """Structural check of a memmap.json dict (the fields the runtime relies on)."""
    try:
        if d["format"] != FORMAT or int(d["version"]) != VERSION:
            raise AccllmError(f"memmap.json format {d.get('format')!r} v{d.get('version')}; expected {FORMAT} v{VERSION}")
        for k in ("program", "io", "kv"):
            b = d["buffers"][k]
            int(b["size"]), int(b["bank"]), str(b["port"])
        int(d["entries"]["decode"]["offset"]), int(d["entries"]["decode"]["length"])
        for e in d["entries"]["prefill"]:
            int(e["tokens"]), int(e["offset"]), int(e["length"])
        for k in ("tokens_in", "logits_out", "argmax_out"):
            int(d["io"][k]["offset"])
    except (KeyError, TypeError, ValueError) as e:
        raise AccllmError(f"memmap.json is missing or has a bad field: {e!r}") from None
