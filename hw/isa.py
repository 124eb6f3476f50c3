"""Instruction set of the accllm accelerator: fixed-width 128-bit words, coarse-grained ops.

One instruction is one whole operation over ``n_tokens`` tokens (register ``n_tokens``, position
of the first token in register ``position``): a whole linear layer (matrix-vector for decode,
matrix-matrix for prefill), a whole RMSNorm, a whole attention block (KV append, RoPE, scores,
softmax, probabilities x V), ... A decoder layer is 8 instructions. One decode program serves every
position; prefill programs exist per length bucket (they differ only in the activation layout).

Word layout (little-endian 128-bit word; byte 0 of the word is bits 7:0; program.bin is the words
back to back, word i at byte 16*i):

    bits   7:0   opcode
    bits  15:8   flags   (per opcode; undefined flag bits must be 0)
    bits  31:16  c       16-bit immediate (a dimension or the layer index, per opcode)
    bits  63:32  a       32-bit operand, usually the destination byte offset in the ``io`` buffer
    bits  95:64  b       32-bit operand, usually the source byte offset in the ``io`` buffer
    bits 127:96  d       32-bit operand, usually a descriptor byte offset in the weight buffers

Operand formats in ``io`` (see docs/numerics.md):
  X32  int32 Q16.16 activations, row t at ``addr + t*stride32(D)``, stride32(D) = align64(4*D)
  X8   int8 activations + per-token scale word, row t at ``addr + t*stride8(D)``,
       stride8(D) = 64 + align64(D); bytes 0..3 of a row: scale word (ma | ea << 16), codes at +64
  TOK  int32 token ids, token t at ``addr + 4*t``

A field that an opcode does not use must be zero; the decoder rejects a word with an unknown opcode
or a non-zero unused field with status ``STATUS_BAD_OPCODE`` (hw/regmap.py) and the index of the word.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from algo.common import AccllmError

WORD_BYTES = 16
VERSION = 2       # 2: TOPK and the ATTN spatten flag (SpAtten token / head pruning)

# --- opcodes -------------------------------------------------------------------------------------
NOP = 0x00
END = 0x01
EMBED = 0x10      # a=dst X32, b=token ids TOK, d=table descriptor (lockstep weights), c=D
RMSNORM = 0x11    # a=dst X8, b=src X32, d=norm descriptor (port-0 constants), c=D
QUANT = 0x12      # a=dst X8, b=src X32, c=D
SILUMUL = 0x13    # a=dst X8, b=src X32 [gate | up] (2*I wide), c=I
ADD = 0x14        # a=dst X32, b=src X32, c=D            dst += src (saturating)
MATMUL = 0x20     # a=dst X32, b=src X8, d=linear descriptor (lockstep weights), c=layer tag
ATTN = 0x30       # a=dst X8, b=src X32 [q | k | v], d=attention descriptor (port-0 constants), c=layer
ARGMAX = 0x40     # a=dst TOK, b=src X32 logits, d=V (vocabulary size)
TOPK = 0x41       # d=SpAtten descriptor (port-0 constants): token / head selection of every layer

# MATMUL flags
F_ACC = 1 << 0      # add the result into dst (residual add), saturating to int32
F_LOGITS = 1 << 1   # lm_head: register flags bit 0 set -> every token's row (logits [n_tokens, V]);
#                     else bit 1 set -> the last token's row only; neither -> skipped
# ATTN flags
F_SPATTEN = 1 << 0  # SpAtten: skip the tokens / heads the top-k engine pruned for this layer, accumulate
#                     token and head importance (attention descriptor word 16: the SpAtten descriptor)
# TOPK (end of every program that uses SpAtten): per layer from the start layer, the top-k engine keeps
# the most important older tokens and heads (cascade: a token or head pruned at layer l stays pruned at
# layers >= l); docs/numerics.md "SpAtten"
# ARGMAX runs only if register flags bit 1 is set; it reads the last token's logits row and writes one id.

# register ``flags`` bits (hw/regmap.py argument "flags")
RF_LOGITS, RF_ARGMAX = 1 << 0, 1 << 1


@dataclass(frozen=True)
class OpSpec:
    name: str
    fields: tuple[str, ...]      # operand fields the opcode uses (others must be 0)
    flags: int                   # mask of accepted flag bits
    doc: str


OPS: dict[int, OpSpec] = {
    NOP: OpSpec("NOP", (), 0, "no operation"),
    END: OpSpec("END", (), 0, "end of program: raise ap_done with status ok"),
    EMBED: OpSpec("EMBED", ("a", "b", "c", "d"), 0, "gather embedding rows of the token ids into X32"),
    RMSNORM: OpSpec("RMSNORM", ("a", "b", "c", "d"), 0, "RMSNorm of X32 rows, times gamma, quantized to X8"),
    QUANT: OpSpec("QUANT", ("a", "b", "c"), 0, "per-token int8 quantization of X32 rows"),
    SILUMUL: OpSpec("SILUMUL", ("a", "b", "c"), 0, "SiLU(gate) * up of X32 [gate|up] rows, quantized to X8"),
    ADD: OpSpec("ADD", ("a", "b", "c"), 0, "residual add dst += src over X32 rows (saturating)"),
    MATMUL: OpSpec("MATMUL", ("a", "b", "c", "d"), F_ACC | F_LOGITS,
                   "linear layer: X8 rows times the packed weights of the descriptor, into X32 rows"),
    ATTN: OpSpec("ATTN", ("a", "b", "c", "d"), F_SPATTEN,
                 "attention: per token, RoPE, 4-bit KV append to the ring buffer, scores, softmax, P x V"),
    ARGMAX: OpSpec("ARGMAX", ("a", "b", "d"), 0, "index of the largest logit (lowest index on ties)"),
    TOPK: OpSpec("TOPK", ("d",), 0, "SpAtten: top-k token and head selection of every layer (cascade)"),
}
BY_NAME = {s.name: op for op, s in OPS.items()}
FLAG_NAMES = {MATMUL: {F_ACC: "acc", F_LOGITS: "logits"}, ATTN: {F_SPATTEN: "spatten"}}


@dataclass(frozen=True)
class Instr:
    op: int
    a: int = 0
    b: int = 0
    c: int = 0
    d: int = 0
    flags: int = 0

    @property
    def name(self) -> str:
        return OPS[self.op].name if self.op in OPS else f"OP_{self.op:02X}"


class DecodeError(AccllmError):
    """An instruction word that the decoder rejects (unknown opcode, reserved field set)."""

    def __init__(self, msg: str, index: int | None = None):
        super().__init__(msg if index is None else f"instruction {index}: {msg}")
        self.index = index


def _check_range(name: str, v: int, bits: int) -> None:
    if not isinstance(v, int) or v < 0 or v >= (1 << bits):
        raise AccllmError(f"instruction field {name}={v!r} does not fit {bits} unsigned bits")


def encode(ins: Instr) -> bytes:
    """Encode one instruction into its 16-byte word; the same checks as the hardware decoder."""
    if ins.op not in OPS:
        raise AccllmError(f"unknown opcode 0x{ins.op:02x}; known: "
                          + ", ".join(f"{s.name}=0x{o:02x}" for o, s in OPS.items()))
    spec = OPS[ins.op]
    _check_range("flags", ins.flags, 8)
    _check_range("c", ins.c, 16)
    for f in ("a", "b", "d"):
        _check_range(f, getattr(ins, f), 32)
    if ins.flags & ~spec.flags:
        raise AccllmError(f"{spec.name}: flag bits 0x{ins.flags & ~spec.flags:02x} are not defined")
    for f in ("a", "b", "c", "d"):
        if f not in spec.fields and getattr(ins, f):
            raise AccllmError(f"{spec.name} does not use field {f}; it must be 0")
    return struct.pack("<BBHIII", ins.op, ins.flags, ins.c, ins.a, ins.b, ins.d)


def decode(word: bytes, index: int | None = None) -> Instr:
    """Decode one 16-byte word; raise DecodeError (carrying *index*) for an illegal word."""
    if len(word) != WORD_BYTES:
        raise DecodeError(f"an instruction word is {WORD_BYTES} bytes, got {len(word)}", index)
    op, flags, c, a, b, d = struct.unpack("<BBHIII", word)
    if op not in OPS:
        raise DecodeError(f"unknown opcode 0x{op:02x}", index)
    spec = OPS[op]
    if flags & ~spec.flags:
        raise DecodeError(f"{spec.name}: undefined flag bits 0x{flags & ~spec.flags:02x}", index)
    vals = dict(a=a, b=b, c=c, d=d)
    for f, v in vals.items():
        if f not in spec.fields and v:
            raise DecodeError(f"{spec.name}: unused field {f} is not zero (0x{v:x})", index)
    return Instr(op, a, b, c, d, flags)


def encode_program(instrs: list[Instr]) -> bytes:
    return b"".join(encode(i) for i in instrs)


def split_words(data: bytes, what: str = "program") -> list[bytes]:
    if len(data) % WORD_BYTES:
        raise AccllmError(f"{what} has {len(data)} bytes, not a multiple of the {WORD_BYTES}-byte "
                          f"instruction word (truncated file?)")
    return [data[i:i + WORD_BYTES] for i in range(0, len(data), WORD_BYTES)]


def decode_program(data: bytes) -> list[Instr]:
    return [decode(w, i) for i, w in enumerate(split_words(data))]


def format_instr(ins: Instr) -> str:
    spec = OPS[ins.op]
    fl = [n for bit, n in FLAG_NAMES.get(ins.op, {}).items() if ins.flags & bit]
    head = spec.name.lower() + ("." + ".".join(fl) if fl else "")
    parts = []
    names = {"a": "dst", "b": "src", "c": "c", "d": "desc"}
    if ins.op in (EMBED,):
        names.update(b="ids", c="D")
    elif ins.op in (RMSNORM, QUANT, ADD):
        names.update(c="D")
    elif ins.op == SILUMUL:
        names.update(c="I")
    elif ins.op in (MATMUL, ATTN):
        names.update(c="layer")
    elif ins.op == ARGMAX:
        names.update(d="V")
    for f in ("a", "b", "d", "c"):
        if f in spec.fields:
            v = getattr(ins, f)
            fmt = f"{v}" if f == "c" or (ins.op == ARGMAX and f == "d") else f"0x{v:08x}"
            parts.append(f"{names[f]}={fmt}")
    return f"{head:<14} " + " ".join(parts)


def disassemble(data: bytes, base_index: int = 0, labels: dict[int, str] | None = None,
                comments: dict[int, str] | None = None) -> str:
    """A readable listing: index, raw word (hex), mnemonic and operands; illegal words are listed
    as ``<illegal: reason>`` rather than stopping the listing."""
    lines = []
    for i, w in enumerate(split_words(data)):
        idx = base_index + i
        if labels and idx in labels:
            lines.append(f"{labels[idx]}:")
        try:
            text = format_instr(decode(w))
        except DecodeError as e:
            text = f"<illegal: {e}>"
        cm = f"  ; {comments[idx]}" if comments and idx in comments else ""
        lines.append(f"{idx:6d}  {w[::-1].hex()}  {text}{cm}")
    return "\n".join(lines)
