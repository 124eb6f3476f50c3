"""Run one program with identical buffers on the functional model and on the RTL kernel.

The RTL side is the kernel of `accllm build-rtl` (sim.rtlsim.device.ensure_rtl: every unit registered
in hw.rtl.kernel.UNITS, the same cached Verilog and Verilator build as `accllm run --backend rtl`).
``DevicePair`` allocates the buffers of hw/regmap.py (program, kv, io, weights<p>) on both devices,
fills them with the same bytes, runs a program and returns both io (and weight) images plus the
status of each side.
"""
from __future__ import annotations

import numpy as np

from hw import isa
from hw.config import HWConfig


class DevicePair:
    """Emu + RTL devices with the same buffers. Sizes in bytes."""

    def __init__(self, cfg: HWConfig, io_bytes=1 << 16, w_bytes=1 << 16, prog_bytes=4096, rtl=None):
        from sim.rtlsim.device import RtlDevice
        from sim.emu import EmuDevice
        self.cfg = cfg
        self.devs = {"emu": EmuDevice(cfg), "rtl": rtl or RtlDevice(cfg, progress=False)}
        self.bufs = {}
        for k, d in self.devs.items():
            b = dict(program=d.alloc(prog_bytes, port="m_axi_ctrl", bank=0, name="program"),
                     io=d.alloc(io_bytes, port="m_axi_ctrl", bank=0, name="io"),
                     kv=d.alloc(64, port="m_axi_ctrl", bank=1, name="kv"))
            for p in range(cfg.weight_ports):
                b[f"weights{p}"] = d.alloc(w_bytes, port=f"m_axi_w{p}", bank=2 + p, name=f"weights{p}")
            self.bufs[k] = b

    def upload(self, name: str, data, offset: int = 0) -> None:
        for k in self.devs:
            self.bufs[k][name].upload(np.asarray(data) if isinstance(data, np.ndarray) else bytes(data), offset)

    def run(self, instrs: list[isa.Instr], n_tokens: int, flags: int = 0, position: int = 0, timeout_s=600.0):
        """Run on both; returns {side: (status, index, io bytes, [weight images], cycles)}."""
        words = isa.encode_program(instrs)
        self.upload("program", words)
        out = {}
        for k, d in self.devs.items():
            b = self.bufs[k]
            for name in ["program", "io", "kv"] + [f"weights{p}" for p in range(self.cfg.weight_ports)]:
                d.set_arg(name, b[name])
            d.set_arg("program_len", len(instrs))
            if "entry" in d.args:
                d.set_arg("entry", 0)
            d.set_arg("position", position)
            d.set_arg("n_tokens", n_tokens)
            d.set_arg("flags", flags)
            d.start()
            code = d.wait(timeout_s)
            idx = d.read_status()[1]
            io = b["io"].download()
            ws = [b[f"weights{p}"].download() for p in range(self.cfg.weight_ports)]
            out[k] = (code, idx, io, ws, d.cycles())
        return out

    def close(self):
        for d in self.devs.values():
            d.close()
