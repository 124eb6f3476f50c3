"""``xrt`` backend: an Alveo U280 through XRT's Python binding ``pyxrt``.

pyxrt is imported lazily (only when this backend is chosen); without XRT the user gets one clear
line. How the accelerator maps onto XRT's model:

* kernel arguments are numbered in the order of hw/regmap.py ``arguments(hw)`` (the order of
  ``kernel.xml``): pointer arguments take an ``xrt.bo``, scalar arguments a 32-bit int. pyxrt binds
  scalar arguments as a C ``int`` and silently skips what it cannot cast (``kernel.__call__``), so we
  only ever pass ``pyxrt.bo`` objects and Python ints in [-2**31, 2**31) (u32 values >= 2**31 are
  passed as their two's complement; 64-bit scalars would have to be split in two u32 arguments — the
  register map has none). Read-only outputs (status, cycles) are never passed.
* a buffer is a ``pyxrt.bo(device, size, bo.flags.normal, kernel.group_id(i))`` where ``i`` is the
  first argument that uses the buffer's AXI master port, so XRT places it in the memory bank the
  xclbin's connectivity (``sp=`` lines of ``accllm package-xo``) gives that port. If the xclbin
  names its memories (``xclbin.get_mems()`` tags such as ``HBM[5]``), the bank the compiler asked for
  is checked against it.
* ``sync_to_device`` = ``bo.write`` + ``bo.sync(XCL_BO_SYNC_BO_TO_DEVICE, size, offset)``;
  ``sync_from_device`` = ``bo.sync(XCL_BO_SYNC_BO_FROM_DEVICE, size, offset)`` + ``bo.read``.
* ``start`` = ``pyxrt.run(kernel)``, ``run.set_arg(i, v)`` for every argument set, ``run.start()``;
  ``wait(t)`` = ``run.wait(t_ms)`` → ``ert_cmd_state``. pyxrt does not bind
  ``xrt::kernel::read_register``; where the binding has it (newer XRT) the status/cycles registers
  are read, otherwise a completed run counts as status 0 and cycles are unknown (None).
"""
from __future__ import annotations

import os
import re

import numpy as np

from algo.common import AccllmError
from hw import regmap
from hw.device import Device, DeviceTimeout

KERNEL_NAME = "accllm_kernel"


def import_pyxrt():
    try:
        import pyxrt  # noqa: F401
    except ImportError:
        raise AccllmError("the xrt backend needs XRT's Python binding pyxrt, which is not installed here "
                          "(install XRT and `source /opt/xilinx/xrt/setup.sh`); use --backend emu or rtl "
                          "without a card") from None
    return pyxrt


class XrtDevice(Device):
    backend = "xrt"
    shared_between_processes = True

    def __init__(self, hw, *, xclbin: str | None = None, device_index: int = 0, kernel_name: str = KERNEL_NAME,
                 pyxrt_module=None):
        self.pyxrt = pyxrt_module if pyxrt_module is not None else import_pyxrt()
        self.device_index = device_index
        super().__init__(hw)
        xclbin = xclbin or os.environ.get("ACCLLM_XCLBIN")
        if not xclbin:
            raise AccllmError("the xrt backend needs the card's bitstream: pass --xclbin FILE (or set "
                              "ACCLLM_XCLBIN); build it with the files of `accllm package-xo`")
        if not os.path.isfile(xclbin):
            raise AccllmError(f"xclbin {xclbin!r} does not exist")
        px = self.pyxrt
        try:
            self.dev = px.device(device_index)
            self.xclbin = px.xclbin(xclbin)
            self.uuid = self.dev.load_xclbin(self.xclbin)
            self.kernel = px.kernel(self.dev, self.uuid, kernel_name, px.kernel.cu_access_mode.exclusive)
        except AccllmError:
            raise
        except Exception as e:  # XRT raises RuntimeError with its own text
            raise AccllmError(f"XRT could not open device {device_index} with {xclbin}: {e}") from None
        self.order = [a for a in regmap.arguments(hw) if a.kind != "ro32"]
        self.index = {a.name: i for i, a in enumerate(regmap.arguments(hw))}
        self.mem_tags = self._memory_tags()
        self._pending: dict[int, object] = {}
        self._shadow: dict[int, int] = {}     # register offset -> last value set (for dumps)
        self._run = None
        self._state = "idle"

    def lock_name(self) -> str:
        return f"xrt-{getattr(self, 'device_index', 0)}"

    # ---- buffers --------------------------------------------------------------------------------
    def _memory_tags(self) -> dict[int, str]:
        try:
            return {int(m.get_index()): str(m.get_tag()) for m in self.xclbin.get_mems()}
        except Exception:
            return {}

    def group_for_port(self, port: str) -> tuple[int, int]:
        """(argument index, memory group id) of the first argument on *port*."""
        for a in regmap.arguments(self.hw):
            if a.port == port:
                i = self.index[a.name]
                return i, self.kernel.group_id(i)
        raise AccllmError(f"no kernel argument uses port {port!r}")

    def _alloc_address(self, size, port, bank):
        return 0        # XRT decides; the real address is read back from the bo in _make_handle

    def _make_handle(self, buf):
        px = self.pyxrt
        i, group = self.group_for_port(buf.port)
        tag = self.mem_tags.get(int(group))
        if tag:
            m = re.fullmatch(r"HBM\[(\d+)(?::(\d+))?\]", tag)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
                if not lo <= buf.bank <= hi:
                    raise AccllmError(f"buffer {buf.name!r}: the package places it in HBM bank {buf.bank}, but the "
                                      f"xclbin connects port {buf.port} (argument {i}) to {tag}; rebuild the "
                                      f"xclbin with the connectivity file of `accllm package-xo` for this package")
        try:
            bo = px.bo(self.dev, buf.size, px.bo.flags.normal, group)
        except Exception as e:
            raise AccllmError(f"XRT could not allocate {buf.size} bytes for buffer {buf.name!r} in memory group "
                              f"{group} ({tag or 'untagged'}): {e}") from None
        buf.address = int(bo.address())
        return bo

    def _free(self, buf):
        buf.handle = None

    def _dev_write(self, buf, offset, data):
        px = self.pyxrt
        buf.handle.write(np.frombuffer(data, dtype=np.uint8), offset)
        buf.handle.sync(px.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE, len(data), offset)

    def _dev_read(self, buf, offset, size):
        px = self.pyxrt
        buf.handle.sync(px.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE, size, offset)
        return np.asarray(buf.handle.read(size, offset)).view(np.uint8).tobytes()

    # ---- arguments and runs ---------------------------------------------------------------------
    def set_arg(self, name, value):
        a = self._arg(name)
        # validate exactly as a register-level device does (types, ports, ranges) ...
        super().set_arg(name, value)
        # ... then keep what pyxrt gets: the bo, or the u32 as a C int
        if a.kind == "ptr":
            self._pending[self.index[name]] = value.handle
        else:
            v = int(value)
            self._pending[self.index[name]] = v - (1 << 32) if v >= 1 << 31 else v

    def write_register(self, offset, value):
        self._shadow[offset] = int(value) & 0xFFFF_FFFF

    def read_register(self, offset):
        if offset == regmap.AP_CTRL:
            return {"idle": regmap.AP_IDLE, "running": 0,
                    "done": regmap.AP_DONE | regmap.AP_IDLE}[self._state]
        ro = {a.offset: a for a in regmap.arguments(self.hw) if a.kind == "ro32"}
        if offset in ro:
            reader = getattr(self.kernel, "read_register", None)
            if reader is None:
                raise AccllmError(f"this pyxrt cannot read kernel registers (no kernel.read_register); "
                                  f"{ro[offset].name} is unknown")
            return int(reader(offset)) & 0xFFFF_FFFF
        return self._shadow.get(offset, 0)

    def start(self):
        self._check_open()
        missing = [a.name for a in self.order if self.index[a.name] not in self._pending]
        if missing:
            raise AccllmError(f"kernel arguments not set before start: {', '.join(missing)}")
        run = self.pyxrt.run(self.kernel)
        for i in sorted(self._pending):
            run.set_arg(i, self._pending[i])
        run.start()
        self._run = run
        self._state = "running"

    def wait(self, timeout_s: float = 60.0) -> int:
        px = self.pyxrt
        if self._run is None:
            raise AccllmError("wait() without start()")
        state = self._run.wait(max(1, int(timeout_s * 1000)))
        completed = px.ert_cmd_state.ERT_CMD_STATE_COMPLETED
        if state != completed:
            dump = self.dump_registers()
            self.reset()
            raise DeviceTimeout(f"xrt run did not complete within {timeout_s:g} s (XRT state {state}); "
                                f"registers: {dump}; the run was dropped and the device is idle")
        self._state = "done"
        self._run = None
        try:
            return self.read_status()[0]
        except AccllmError:
            return regmap.STATUS_OK     # completed, status register not readable through this pyxrt

    def cycles(self):
        try:
            return super().cycles()
        except AccllmError:
            return None

    def registers(self):
        out = {"AP_CTRL": self.read_register(regmap.AP_CTRL)}
        for a in regmap.arguments(self.hw):
            try:
                out[a.name] = self.read_arg(a.name)
            except AccllmError:
                pass
        return out

    def reset(self):
        self._run = None
        self._state = "idle"

    def close(self):
        self._run = None
        self.kernel = None
        super().close()
