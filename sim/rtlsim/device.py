"""``rtl`` backend: the generated Verilog under Verilator (or Icarus) through cocotb, in a separate
process driven over a local Unix socket by the same calls as the card: register reads/writes on
``s_axi_control`` (cocotbext-axi AxiLiteMaster), buffer contents in AxiRam models on every AXI4
master port. See server.py (inside the simulator) and launch.py (the child process).

The child runs in its own process group; ``close()`` (also on Ctrl-C, at exit, or when the object is
collected) asks it to quit and then kills the whole group, so no simulator is left behind. If the host
dies, the server sees the socket close and the simulation ends.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from algo.common import AccllmError, cache_dir, child_pythonpath
from hw.device import Device

from .server import recv_msg, send_msg


def _rtl_sources_digest() -> str:
    import hw
    root = Path(hw.__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(("hw/" + p.relative_to(root).as_posix()).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def ensure_rtl(hw, progress: bool = True) -> Path:
    """The Verilog of `accllm build-rtl` for *hw*, cached by configuration and hw/ sources."""
    key = hashlib.sha256((hw.to_json() + _rtl_sources_digest()).encode()).hexdigest()[:16]
    out = cache_dir("rtl-kernel") / f"{hw.name}-{key}"
    if out.is_dir() and any(out.glob("*.v")):
        return out
    from hw.build_rtl import build
    if progress:
        print(f"[rtl] generating the Verilog of the {hw.name} kernel into {out}", file=sys.stderr, flush=True)
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):     # the build's log must not mix into a --json stdout
        build(hw, out, log=lambda *a: print(*a, file=sys.stderr, flush=True) if progress else None)
    if not any(out.glob("*.v")):
        raise AccllmError(f"generating the Verilog of the {hw.name} kernel left no Verilog in {out}")
    return out


class RtlUnsupported(AccllmError):
    """The program uses an opcode the RTL kernel has no execution unit for."""


def missing_units(program: bytes) -> list[str]:
    """Names of the opcodes (or opcode.flag) in *program* that the RTL kernel (hw.rtl.kernel.UNITS) cannot
    execute: no unit for the opcode, or a flag the unit does not implement (its ``FLAGS``)."""
    from hw import isa
    from hw.rtl.kernel import UNITS, unit_flags
    out = set()
    for ins in isa.decode_program(program):
        if ins.op in (isa.END, isa.NOP):
            continue
        if ins.op not in UNITS:
            out.add(isa.OPS[ins.op].name)
            continue
        extra = ins.flags & ~unit_flags(ins.op, UNITS[ins.op])
        for bit, name in isa.FLAG_NAMES.get(ins.op, {}).items():
            if extra & bit:
                out.add(f"{isa.OPS[ins.op].name}.{name}")
    return sorted(out)


def check_program_supported(package_dir) -> None:
    """Refuse, before any simulator is built, a program the RTL kernel cannot run to the end."""
    prog = Path(package_dir) / "program.bin"
    missing = missing_units(prog.read_bytes())
    if missing:
        raise RtlUnsupported(f"the RTL kernel does not implement {', '.join(missing)} yet (no execution unit for "
                             f"the opcode, or OPCODE.flag: a flag its unit lacks), which {prog} uses; run it "
                             f"with --backend emu")


_LIVE: "weakref.WeakSet[RtlDevice]" = weakref.WeakSet()


@atexit.register
def _close_all():
    for d in list(_LIVE):
        d.close()


class RtlDevice(Device):
    backend = "rtl"

    def __init__(self, hw, *, rtl_dir: str | None = None, simulator: str | None = None,
                 start_timeout_s: float = 900.0, latency: int | None = None, progress: bool = True,
                 check_ports: bool = True, mem: str | None = None):
        super().__init__(hw)
        # the simulator: verilator (default) or icarus (ACCLLM_RTL_SIMULATOR; ~100x slower)
        simulator = simulator or os.environ.get("ACCLLM_RTL_SIMULATOR") or "verilator"
        from sim.toolchain import SIMULATORS
        if simulator not in SIMULATORS:
            raise AccllmError(f"rtl simulator {simulator!r}: use {' or '.join(SIMULATORS)} (ACCLLM_RTL_SIMULATOR)")
        self.simulator = simulator
        self.proc = None
        self.sock = None
        self.sim_cycles = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="accllm-rtl-")
        rtl = Path(rtl_dir) if rtl_dir else ensure_rtl(hw, progress=progress)
        if not rtl.is_dir() or not any(rtl.glob("*.v")):
            raise AccllmError(f"rtl directory {rtl} has no Verilog (expected `accllm build-rtl --out` output)")
        self.rtl_dir = rtl
        path = os.path.join(self._tmp.name, "sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        self.log_path = Path(self._tmp.name) / "sim.log"
        period_ns = 1000.0 / hw.clock_mhz
        lat = latency if latency is not None else hw.hbm_latency_cycles
        # memories: Verilog models in the simulation top (fast, default) or cocotbext-axi AxiRam
        # (ACCLLM_RTL_MEM=cocotb: every AXI handshake through the Python models)
        self.mem = mem or os.environ.get("ACCLLM_RTL_MEM") or self._default_mem(rtl, hw)
        if self.mem not in ("hdl", "cocotb"):
            raise AccllmError(f"rtl memory model {self.mem!r}: use hdl or cocotb (ACCLLM_RTL_MEM)")
        cmd = [sys.executable, "-m", "sim.rtlsim.launch", "--sock", path, "--rtl", str(rtl),
               "--simulator", simulator, "--period-ns", f"{period_ns:g}", "--latency", str(lat),
               "--mem", self.mem, "--weight-ports", str(hw.weight_ports), "--width", str(hw.port_width_bits)]
        env = dict(os.environ)
        env["PYTHONPATH"] = child_pythonpath()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self._tmp.name, env=env, start_new_session=True)
        _LIVE.add(self)
        weakref.finalize(self, RtlDevice._kill, self.proc)
        try:
            srv.settimeout(0.5)
            deadline = time.monotonic() + start_timeout_s
            while True:
                try:
                    self.sock, _ = srv.accept()
                    break
                except socket.timeout:
                    if self.proc.poll() is not None:
                        raise AccllmError(f"the RTL simulator exited before connecting (exit {self.proc.returncode}); "
                                          f"last lines of its log:\n{self._log_tail()}") from None
                    if time.monotonic() > deadline:
                        raise AccllmError(f"the RTL simulator did not connect within {start_timeout_s:g} s; "
                                          f"log:\n{self._log_tail()}") from None
            self.sock.settimeout(None)
            hello, _ = recv_msg(self.sock)
            self.sim_ports = hello.get("ports", [])
            missing = [p for p in self.ports() if p not in self.sim_ports] if check_ports else []
            if missing:
                raise AccllmError(f"the Verilog in {rtl} has no AXI master port(s) {', '.join(missing)} that the "
                                  f"register map of {hw.name} needs (it has {', '.join(self.sim_ports)})")
        except BaseException:
            srv.close()
            self.close()
            raise
        srv.close()

    def lock_name(self) -> str:
        return f"rtl-{id(self)}"

    @staticmethod
    def _default_mem(rtl: Path, hw) -> str:
        """hdl (the simulation top with Verilog memories) for a full kernel; cocotb for a stand-in design
        without the kernel's AXI masters (the simulation top could not be wired to it)."""
        text = "".join(p.read_text(errors="replace") for p in Path(rtl).glob("*.v"))
        need = ["m_axi_ctrl_arvalid"] + [f"m_axi_w{p}_awvalid" for p in range(hw.weight_ports)]
        return "hdl" if all(n in text for n in need) else "cocotb"

    def _alloc_address(self, size: int, port: str, bank: int) -> int:
        """bank * BANK_BYTES + an offset that is unique per AXI port: the simulation has one memory per
        port and ignores the bank bits, so buffers of one port in different banks (program in bank 0,
        kv in bank 1 on m_axi_ctrl) must not share offsets."""
        from hw.device import ALIGN, BANK_BYTES
        nxt = self.__dict__.setdefault("_port_next", {})
        off = nxt.get(port, ALIGN)            # offset 0 is never a buffer (an unset pointer)
        limit = BANK_BYTES
        if getattr(self, "mem", "hdl") == "hdl":
            from sim.simtop import MEM_ADDR_BITS
            limit = 1 << MEM_ADDR_BITS
        if off + size > limit:
            raise AccllmError(f"buffer of {size} bytes on {port} ends past the {limit >> 20} MiB that the simulated "
                              f"memory of each port holds (sim/simtop.py MEM_ADDR_BITS)")
        nxt[port] = off + (size + ALIGN - 1) // ALIGN * ALIGN
        return bank * BANK_BYTES + off

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def _call(self, hdr: dict, data: bytes = b""):
        if self.sock is None:
            raise AccllmError("the rtl device is closed")
        try:
            send_msg(self.sock, hdr, data)
            rep, payload = recv_msg(self.sock)
        except KeyboardInterrupt:
            self._desync = True          # a reply may be half read: this connection is done
            raise
        except (ConnectionError, OSError, json.JSONDecodeError) as e:
            raise AccllmError(f"lost the RTL simulator ({e}); last lines of its log:\n{self._log_tail()}") from None
        if not rep.get("ok"):
            raise AccllmError(f"RTL simulator: {rep.get('error')}")
        return rep, payload

    # ---- Device primitives ---------------------------------------------------------------------
    def read_register(self, offset: int) -> int:
        return int(self._call({"op": "read_reg", "off": offset})[0]["val"])

    def write_register(self, offset: int, value: int) -> None:
        self._call({"op": "write_reg", "off": offset, "val": int(value) & 0xFFFF_FFFF})

    def _dev_write(self, buf, offset, data):
        step = 8 << 20
        for o in range(0, len(data), step):
            self._call({"op": "mem_write", "port": buf.port, "addr": buf.address + offset + o}, data[o:o + step])

    def _dev_read(self, buf, offset, size):
        return self._call({"op": "mem_read", "port": buf.port, "addr": buf.address + offset, "len": size})[1]

    def _poll(self, timeout_s: float) -> bool:
        rep, _ = self._call({"op": "wait", "timeout_s": timeout_s, "poll": 32})
        self.sim_cycles += int(rep.get("sim_cycles", 0))
        return bool(rep["done"])

    def reset(self) -> None:
        if getattr(self, "_desync", False):
            self.close()                 # interrupted mid-call: end the simulation (nothing left running)
        elif self.sock is not None:
            self._call({"op": "reset"})

    # ---- lifetime ------------------------------------------------------------------------------
    @staticmethod
    def _kill(proc) -> None:
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(3)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.settimeout(2.0)
                send_msg(self.sock, {"op": "quit"})
                recv_msg(self.sock)
            except Exception:
                pass
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
            RtlDevice._kill(self.proc)
            # the simulator binary is in the same process group; make sure it is gone too
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None
        super().close()
