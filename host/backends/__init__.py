"""Device backends behind hw/device.py: ``emu`` (the functional model, sim/emu.py), ``rtl``
(the generated Verilog under Verilator through cocotb, in a subprocess) and ``xrt`` (an Alveo card
through pyxrt). ``open_device(name, hw, ...)`` is the one way the runtime gets a device."""
from __future__ import annotations

from algo.common import AccllmError

BACKENDS = ("emu", "rtl", "xrt")


def open_device(backend: str, hw, *, xclbin: str | None = None, device_index: int = 0,
                rtl_dir: str | None = None, simulator: str | None = None, **kw):
    """A fresh device of *backend* for hardware configuration *hw* (an HWConfig)."""
    if backend == "emu":
        try:
            from sim.emu import EmuDevice
        except ImportError as e:
            raise AccllmError(f"the functional model (sim/emu.py) is not available: {e}") from None
        return EmuDevice(hw, **kw)
    if backend == "rtl":
        from sim.rtlsim.device import RtlDevice
        return RtlDevice(hw, rtl_dir=rtl_dir, simulator=simulator, **kw)
    if backend == "xrt":
        from .xrt import XrtDevice
        return XrtDevice(hw, xclbin=xclbin, device_index=device_index, **kw)
    raise AccllmError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
