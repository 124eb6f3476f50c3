"""The device interface every backend implements: the functional model (``emu``, in process), the
RTL under Verilator (``rtl``, a subprocess) and the Alveo card (``xrt``, through pyxrt).

The host runtime (host/runtime.py) talks to the accelerator only through this class, so it cannot
tell the backends apart except by speed. The model is Vitis' RTL-kernel model:

* **Buffers** live in device memory (HBM). ``Device.alloc(size, port=..., bank=...)`` returns a
  :class:`Buffer` with a 64-bit device ``address`` in HBM pseudo-channel ``bank`` (0..31), used on the
  AXI4 master ``port`` (a name from hw/regmap.py: ``m_axi_ctrl``, ``m_axi_w0`` ...). Every buffer has a
  host-side shadow (like an XRT ``bo``): ``Buffer.write(data, offset)`` fills the shadow,
  ``Buffer.sync_to_device()`` copies it (or a byte range of it) to the device, ``sync_from_device()``
  copies device memory into the shadow, ``Buffer.read(size, offset)`` reads the shadow.
  ``upload()``/``download()`` combine the two steps.
* **Registers** on ``s_axi_control`` at the offsets of hw/regmap.py (ap_ctrl_hs at 0x00, arguments
  from 0x10, 64-bit pointers as two 32-bit words, low word first).
  ``set_arg(name, value)`` takes a regmap argument name and a :class:`Buffer` (for ``ptr``
  arguments: its address is written) or an int (for ``u32`` arguments, 0 <= v < 2**32).
  ``start()`` raises ap_start; ``wait(timeout_s)`` waits for ap_done and returns the STATUS register's
  code (bits 7:0; hw.regmap.STATUS_*). A run that does not finish in time raises
  :class:`DeviceTimeout` (an AccllmError) with a dump of every register, after ``reset()`` has put the
  device back to idle, so the device stays usable.
* **Sessions**: a device executes one program at a time for one owner. ``Device.session(owner)`` is a
  context manager holding the device's lock: in-process (a threading lock) and, for devices other
  processes can reach (the card), a file lock. A second session is refused with an AccllmError naming
  the holder (``wait_s=0``, the default), or waits up to ``wait_s`` seconds and is then serialised —
  never interleaved. The runtime holds one session for its lifetime.

What a backend implements (the abstract methods, all register/byte level):

* ``read_register(offset) -> int`` and ``write_register(offset, value)`` — 32-bit words on
  s_axi_control. A register-level device (emu, rtl) starts executing when ap_start is written to
  AP_CTRL and sets AP_DONE|AP_IDLE in AP_CTRL when finished (AP_DONE is cleared on read, as in
  ap_ctrl_hs); the ``status``/``cycles_lo``/``cycles_hi`` argument registers are read-only outputs.
* ``_dev_write(buf, offset, data: bytes)`` and ``_dev_read(buf, offset, size) -> bytes`` — move bytes
  between host and device memory of one buffer (offset relative to the buffer's start).
* optional: ``_alloc_address(size, port, bank) -> int`` (default: a bump allocator per bank inside the
  bank's 256 MiB window at ``bank * 0x1000_0000``, 4 KiB aligned, like the U280's HBM address map),
  ``_free(buf)``, ``reset()`` (abort a run, back to idle; default nothing), ``close()``, and
  ``_poll(timeout_s) -> bool`` (how ``wait`` waits for done; default polls AP_CTRL).

A backend whose runs are not register-level (XRT: pyxrt's ``run`` sets arguments by index) overrides
``set_arg``/``start``/``wait`` as well; the contract above (names, value types, status, timeout) is the
same.

:class:`MemoryDevice` is a ready-made base for in-process models (the functional model): device
memory as numpy byte arrays per buffer, a register file, ``resolve(address, size)`` to turn a device
address range into a writable numpy view (or None if outside every buffer: STATUS_ADDR_RANGE), and
an ``execute()`` hook called synchronously when ap_start is written.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from algo.common import AccllmError
from hw import regmap
from hw.config import HWConfig

HBM_BANKS = 32
BANK_BYTES = 0x1000_0000          # 256 MiB per HBM pseudo-channel on the U280
ALIGN = 4096


class DeviceTimeout(AccllmError):
    """The device did not raise ap_done in time. The message holds the register dump."""


class DeviceBusy(AccllmError):
    """Another session holds the device."""


class DeviceError(AccllmError):
    """The device finished a run with a non-zero status code."""


@dataclass
class Buffer:
    """A device buffer with its host shadow. Create with ``Device.alloc``."""
    device: "Device"
    name: str
    size: int
    port: str
    bank: int
    address: int
    handle: object = None                      # backend object (pyxrt.bo, emu array, ...)
    host: np.ndarray = field(default=None, repr=False)   # uint8 shadow

    def __post_init__(self):
        if self.host is None:
            self.host = np.zeros(self.size, dtype=np.uint8)

    def _range(self, offset: int, size: int | None) -> tuple[int, int]:
        size = self.size - offset if size is None else size
        if offset < 0 or size < 0 or offset + size > self.size:
            raise AccllmError(f"buffer {self.name!r} ({self.size} bytes): range [{offset}, {offset + size}) "
                              f"is outside it")
        return offset, size

    def write(self, data, offset: int = 0) -> None:
        """Copy *data* (bytes-like or numpy array, any dtype: its raw bytes) into the host shadow."""
        b = np.frombuffer(bytes(data) if not isinstance(data, np.ndarray) else
                          np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
        offset, n = self._range(offset, b.size)
        self.host[offset:offset + n] = b

    def read(self, size: int | None = None, offset: int = 0) -> bytes:
        offset, size = self._range(offset, size)
        return self.host[offset:offset + size].tobytes()

    def sync_to_device(self, size: int | None = None, offset: int = 0) -> None:
        offset, size = self._range(offset, size)
        self.device._dev_write(self, offset, self.host[offset:offset + size].tobytes())

    def sync_from_device(self, size: int | None = None, offset: int = 0) -> None:
        offset, size = self._range(offset, size)
        data = self.device._dev_read(self, offset, size)
        if len(data) != size:
            raise AccllmError(f"buffer {self.name!r}: device returned {len(data)} bytes, expected {size}")
        self.host[offset:offset + size] = np.frombuffer(data, dtype=np.uint8)

    def upload(self, data, offset: int = 0) -> None:
        """write + sync_to_device of the same range."""
        n = data.nbytes if isinstance(data, np.ndarray) else len(data)
        self.write(data, offset)
        self.sync_to_device(n, offset)

    def download(self, size: int | None = None, offset: int = 0) -> bytes:
        """sync_from_device + read of the same range."""
        self.sync_from_device(size, offset)
        return self.read(size, offset)


_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


class Device:
    """Abstract accelerator device (see the module docstring for the contract)."""

    backend = "abstract"        # "emu" | "rtl" | "xrt"
    shared_between_processes = False   # True: the session lock is also a file lock (see lock_name)

    def __init__(self, hw: HWConfig):
        self.hw = hw
        self.args = {a.name: a for a in regmap.arguments(hw)}
        self.buffers: list[Buffer] = []
        self._next_free = [ALIGN] * HBM_BANKS     # address 0 is never a buffer (an unset pointer)
        self._session_owner: str | None = None
        self._lock_file = None
        self.closed = False
        self._thread_lock = self._process_lock(self.lock_name())

    # ---- to implement ---------------------------------------------------------------------------
    def read_register(self, offset: int) -> int:
        raise NotImplementedError

    def write_register(self, offset: int, value: int) -> None:
        raise NotImplementedError

    def _dev_write(self, buf: Buffer, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def _dev_read(self, buf: Buffer, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def reset(self) -> None:
        """Abort a run and return to idle (registers may be cleared; buffers are kept)."""

    def close(self) -> None:
        self.closed = True

    def lock_name(self) -> str:
        """Identity of the physical device for the session lock (one per object unless shared)."""
        return f"{self.backend}-{id(self)}"

    # ---- buffers --------------------------------------------------------------------------------
    def ports(self) -> list[str]:
        return sorted({a.port for a in self.args.values() if a.port})

    def _alloc_address(self, size: int, port: str, bank: int) -> int:
        off = self._next_free[bank]
        if off + size > BANK_BYTES:
            raise AccllmError(f"HBM bank {bank} is full: {size} bytes asked, {BANK_BYTES - off} left of "
                              f"{BANK_BYTES}")
        self._next_free[bank] = off + (size + ALIGN - 1) // ALIGN * ALIGN
        return bank * BANK_BYTES + off

    def _make_handle(self, buf: Buffer):
        return None

    def _free(self, buf: Buffer) -> None:
        pass

    def alloc(self, size: int, *, port: str, bank: int, name: str = "") -> Buffer:
        """Allocate *size* bytes in HBM pseudo-channel *bank* for use on AXI master *port*."""
        self._check_open()
        if not isinstance(size, (int, np.integer)) or size <= 0:
            raise AccllmError(f"buffer {name!r}: size must be a positive number of bytes, got {size!r}")
        if port not in self.ports():
            raise AccllmError(f"buffer {name!r}: unknown port {port!r}; this configuration ({self.hw.name}) "
                              f"has {', '.join(self.ports())}")
        if not isinstance(bank, (int, np.integer)) or not 0 <= bank < HBM_BANKS:
            raise AccllmError(f"buffer {name!r}: bank must be an HBM pseudo-channel 0..{HBM_BANKS - 1}, got {bank!r}")
        size, bank = int(size), int(bank)
        addr = self._alloc_address(size, port, bank)
        buf = Buffer(self, name or f"buf{len(self.buffers)}", size, port, bank, addr)
        buf.handle = self._make_handle(buf)
        self.buffers.append(buf)
        return buf

    def free(self, buf: Buffer) -> None:
        self._free(buf)
        if buf in self.buffers:
            self.buffers.remove(buf)

    # ---- registers and runs ---------------------------------------------------------------------
    def _arg(self, name: str) -> regmap.Arg:
        if name not in self.args:
            raise AccllmError(f"unknown kernel argument {name!r}; the register map of {self.hw.name} has "
                              f"{', '.join(self.args)}")
        return self.args[name]

    def set_arg(self, name: str, value) -> None:
        a = self._arg(name)
        if a.kind == "ptr":
            if not isinstance(value, Buffer):
                raise AccllmError(f"kernel argument {name} is a buffer pointer; got {type(value).__name__}")
            if value.device is not self:
                raise AccllmError(f"kernel argument {name}: buffer {value.name!r} belongs to another device")
            if value.port != a.port:
                raise AccllmError(f"kernel argument {name} is used on port {a.port}; buffer {value.name!r} "
                                  f"was allocated for {value.port}")
            self.write_register(a.offset, value.address & 0xFFFF_FFFF)
            self.write_register(a.offset + 4, value.address >> 32)
        elif a.kind == "u32":
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 1 << 32:
                raise AccllmError(f"kernel argument {name} is a 32-bit unsigned int; got {value!r}")
            self.write_register(a.offset, int(value))
        else:
            raise AccllmError(f"kernel argument {name} is read-only (an output of the kernel)")

    def read_arg(self, name: str) -> int:
        a = self._arg(name)
        v = self.read_register(a.offset)
        if a.kind == "ptr":
            v |= self.read_register(a.offset + 4) << 32
        return v

    def start(self) -> None:
        self._check_open()
        self.write_register(regmap.AP_CTRL, regmap.AP_START)

    def _poll(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        delay = 1e-5
        while True:
            if self.read_register(regmap.AP_CTRL) & regmap.AP_DONE:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def wait(self, timeout_s: float = 60.0) -> int:
        """Wait for ap_done; return the status code (0 ok). Timeout: DeviceTimeout after reset()."""
        if not self._poll(timeout_s):
            dump = self.dump_registers()
            self.reset()
            raise DeviceTimeout(f"{self.backend} device did not finish within {timeout_s:g} s "
                                f"(status {regmap.STATUS_TIMEOUT}: {regmap.STATUS_NAMES[regmap.STATUS_TIMEOUT]}); "
                                f"registers: {dump}; the device was reset and is idle")
        return self.read_status()[0]

    def read_status(self) -> tuple[int, int]:
        """(status code, index of the failing instruction)."""
        v = self.read_arg("status")
        return v & 0xFF, v >> 8

    def cycles(self) -> int:
        return self.read_arg("cycles_lo") | (self.read_arg("cycles_hi") << 32)

    def registers(self) -> dict[str, int]:
        out = {"AP_CTRL": self.read_register(regmap.AP_CTRL), "GIE": self.read_register(regmap.GIE),
               "IER": self.read_register(regmap.IER), "ISR": self.read_register(regmap.ISR)}
        for a in self.args.values():
            out[a.name] = self.read_arg(a.name)
        return out

    def dump_registers(self) -> str:
        try:
            regs = self.registers()
        except Exception as e:  # a dead device must not hide the original error
            return f"<registers unreadable: {e}>"
        parts = [f"{k}=0x{v:x}" for k, v in regs.items()]
        code = regs.get("status", 0) & 0xFF
        parts.append(f"(status: {regmap.STATUS_NAMES.get(code, 'unknown')} at instruction {regs.get('status', 0) >> 8})")
        return " ".join(parts)

    def run(self, timeout_s: float = 60.0, **args) -> int:
        """set_arg for every keyword, start, wait; raise DeviceError on a non-zero status."""
        for k, v in args.items():
            self.set_arg(k, v)
        self.start()
        code = self.wait(timeout_s)
        if code != regmap.STATUS_OK:
            idx = self.read_status()[1]
            raise DeviceError(f"{self.backend} device stopped with status {code} "
                              f"({regmap.STATUS_NAMES.get(code, 'unknown')}) at instruction {idx}; "
                              f"registers: {self.dump_registers()}")
        return code

    # ---- sessions -------------------------------------------------------------------------------
    @staticmethod
    def _process_lock(name: str) -> threading.Lock:
        with _PROCESS_LOCKS_GUARD:
            return _PROCESS_LOCKS.setdefault(name, threading.Lock())

    @contextlib.contextmanager
    def session(self, owner: str = "session", wait_s: float = 0.0):
        """Hold the device for one owner. wait_s=0: refuse if busy; >0: wait (serialise) that long."""
        self._check_open()
        ok = self._thread_lock.acquire(timeout=wait_s) if wait_s > 0 else self._thread_lock.acquire(blocking=False)
        if not ok:
            raise DeviceBusy(f"{self.backend} device is busy: held by session {self._session_owner!r}; "
                             f"one session at a time (wait for it to finish, or pass a wait time)")
        try:
            if self.shared_between_processes:
                self._lock_file = self._acquire_file_lock(owner, wait_s)
            self._session_owner = owner
            try:
                yield self
            finally:
                self._session_owner = None
                if self._lock_file is not None:
                    self._release_file_lock(self._lock_file)
                    self._lock_file = None
        finally:
            self._thread_lock.release()

    def _acquire_file_lock(self, owner: str, wait_s: float):
        import fcntl
        from algo.common import cache_dir
        path = Path(cache_dir("locks")) / f"{self.lock_name()}.lock"
        f = open(path, "a+")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    f.close()
                    raise DeviceBusy(f"{self.backend} device {self.lock_name()} is busy: held by {holder}; "
                                     f"one session at a time") from None
                time.sleep(0.05)
        f.seek(0)
        f.truncate()
        f.write(f"{owner} (pid {os.getpid()})")
        f.flush()
        return f

    @staticmethod
    def _release_file_lock(f) -> None:
        import fcntl
        with contextlib.suppress(Exception):
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()

    @property
    def busy_by(self) -> str | None:
        return self._session_owner

    def _check_open(self) -> None:
        if self.closed:
            raise AccllmError(f"{self.backend} device is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MemoryDevice(Device):
    """Base for in-process devices (the functional model): device memory is a numpy uint8 array per
    buffer, registers a dict. Writing AP_START to AP_CTRL calls ``execute()`` synchronously (the
    subclass runs the program; it reads arguments with ``read_arg``/``arg_buffer`` and memory with
    ``resolve``) and then sets STATUS, the cycle counter and AP_DONE|AP_IDLE."""

    def __init__(self, hw: HWConfig):
        super().__init__(hw)
        self.regs: dict[int, int] = {regmap.AP_CTRL: regmap.AP_IDLE}
        self.mem: dict[int, np.ndarray] = {}     # buffer address -> device bytes

    def _make_handle(self, buf: Buffer):
        arr = np.zeros(buf.size, dtype=np.uint8)
        self.mem[buf.address] = arr
        return arr

    def _free(self, buf: Buffer) -> None:
        self.mem.pop(buf.address, None)

    def _dev_write(self, buf: Buffer, offset: int, data: bytes) -> None:
        buf.handle[offset:offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def _dev_read(self, buf: Buffer, offset: int, size: int) -> bytes:
        return buf.handle[offset:offset + size].tobytes()

    def resolve(self, address: int, size: int) -> np.ndarray | None:
        """A writable view of device memory [address, address+size), or None if it is not inside one
        buffer (the caller then stops with STATUS_ADDR_RANGE)."""
        for buf in self.buffers:
            if buf.address <= address and address + size <= buf.address + buf.size:
                o = address - buf.address
                return buf.handle[o:o + size]
        return None

    def arg_buffer(self, name: str) -> Buffer | None:
        """The buffer whose start address is in pointer argument *name* (None if none)."""
        addr = self.read_arg(name)
        for buf in self.buffers:
            if buf.address == addr:
                return buf
        return None

    def read_register(self, offset: int) -> int:
        v = self.regs.get(offset, 0)
        if offset == regmap.AP_CTRL and v & regmap.AP_DONE:
            self.regs[offset] = v & ~regmap.AP_DONE       # clear on read (ap_ctrl_hs)
        return v

    def write_register(self, offset: int, value: int) -> None:
        value &= 0xFFFF_FFFF
        ro = {a.offset for a in self.args.values() if a.kind == "ro32"}
        if offset in ro:
            return                                          # read-only: writes are ignored, as in RTL
        if offset == regmap.AP_CTRL:
            if value & regmap.AP_START:
                self.regs[regmap.AP_CTRL] = regmap.AP_START
                t0 = time.perf_counter()
                code, index, cycles = self.execute()
                self.last_run_seconds = time.perf_counter() - t0
                self._finish(code, index, cycles)
            return
        self.regs[offset] = value

    def _finish(self, code: int, index: int, cycles: int) -> None:
        self.regs[self.args["status"].offset] = (code & 0xFF) | ((index & 0xFF_FFFF) << 8)
        self.regs[self.args["cycles_lo"].offset] = cycles & 0xFFFF_FFFF
        self.regs[self.args["cycles_hi"].offset] = (cycles >> 32) & 0xFFFF_FFFF
        self.regs[regmap.AP_CTRL] = regmap.AP_DONE | regmap.AP_IDLE | regmap.AP_READY

    def execute(self) -> tuple[int, int, int]:
        """Run the program the argument registers describe. Return (status code, failing instruction
        index, cycles). Subclasses implement it."""
        raise NotImplementedError

    def reset(self) -> None:
        self.regs[regmap.AP_CTRL] = regmap.AP_IDLE
