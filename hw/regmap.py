"""The accelerator's register map on ``s_axi_control`` — one definition for the RTL kernel shell,
``kernel.xml``, the functional model's device interface and the host runtime.

Vitis ap_ctrl_hs block at 0x00-0x0C; kernel arguments from 0x10. 64-bit pointer arguments take two
32-bit words (low word first). The map depends on the hardware configuration only through the
number of weight ports (one pointer per AXI4 master that streams weights).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import HWConfig

AP_CTRL, GIE, IER, ISR = 0x00, 0x04, 0x08, 0x0C
AP_START, AP_DONE, AP_IDLE, AP_READY = 1 << 0, 1 << 1, 1 << 2, 1 << 3
AUTO_RESTART = 1 << 7

# Status codes (register STATUS, bits 7:0); the instruction index of the failure is in bits 31:8.
# The same codes are set by the RTL and the functional model.
STATUS_OK = 0
STATUS_BAD_OPCODE = 1          # unknown opcode or reserved field set
STATUS_ADDR_RANGE = 2          # an access outside the buffer its argument describes
STATUS_NO_END = 3              # program ran past its length without END
STATUS_POSITION = 4            # position beyond the configured cache / context
STATUS_KV_REGION = 5           # KV region too small for sink + window
STATUS_SHAPE = 6               # an operand shape beyond the configuration's limits
STATUS_TIMEOUT = 7             # set by the host runtime only (device did not finish)
STATUS_NAMES = {0: "ok", 1: "bad opcode", 2: "address out of range", 3: "program without END",
                4: "position beyond configured context", 5: "KV region too small", 6: "shape beyond limits",
                7: "timeout"}


@dataclass(frozen=True)
class Arg:
    name: str
    offset: int
    kind: str        # "ptr" (64-bit address, an AXI master's buffer) | "u32" (scalar in) | "ro32" (status out)
    port: str | None  # the AXI4 master the pointer is used on
    doc: str


def weights_arg(p: int) -> str:
    """Name of the pointer argument of weight port *p* (the buffer streamed on ``m_axi_w<p>``)."""
    return f"weights{p}"


def arguments(cfg: HWConfig) -> list[Arg]:
    args: list[Arg] = []
    off = 0x10

    def add(name, kind, port, doc):
        nonlocal off
        args.append(Arg(name, off, kind, port, doc))
        off += 8 if kind == "ptr" else 4

    add("program", "ptr", "m_axi_ctrl", "instruction words (program.bin)")
    add("kv", "ptr", "m_axi_ctrl", "KV-cache region (sink + window slots per layer and KV head)")
    add("io", "ptr", "m_axi_ctrl", "activations, token ids in, logits / token out, scratch")
    for p in range(cfg.weight_ports):
        add(weights_arg(p), "ptr", f"m_axi_w{p}", f"weights streamed on port {p} (HBM pseudo-channel {p})")
    add("program_len", "u32", None, "number of 128-bit instruction words in the program buffer")
    add("position", "u32", None, "position of the first token of this run")
    add("n_tokens", "u32", None, "tokens in this run (1 for decode, the block length for prefill)")
    add("flags", "u32", None, "bit 0: write logits, bit 1: write argmax token")
    add("status", "ro32", None, "bits 7:0 status code, bits 31:8 index of the failing instruction")
    add("cycles_lo", "ro32", None, "cycles of the last run, low word")
    add("cycles_hi", "ro32", None, "cycles of the last run, high word")
    # appended (offsets above unchanged): instruction index where the run starts (program entry point;
    # decode and prefill-bucket programs share one program buffer, see hw/memmap.py)
    add("entry", "u32", None, "instruction index of the entry point (program_len counts from index 0)")
    return args


def as_json(cfg: HWConfig) -> dict:
    return {
        "hw": cfg.name,
        "control": {"AP_CTRL": AP_CTRL, "GIE": GIE, "IER": IER, "ISR": ISR,
                    "bits": {"start": 0, "done": 1, "idle": 2, "ready": 3, "auto_restart": 7}},
        "arguments": [a.__dict__ for a in arguments(cfg)],
        "status_codes": STATUS_NAMES,
        "address_bits": 64,
    }
