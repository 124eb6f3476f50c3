"""cocotb test module that turns the simulated kernel into a device server (the ``rtl`` backend).

Runs inside the simulator (Verilator or Icarus, launched by sim/rtlsim/launch.py). It connects
to the Unix socket in ``$ACCLLM_RTL_SOCK`` and serves the host's calls until the host says ``quit``
or the socket closes (the host died): the simulation then ends.

Wire format, both directions: 4-byte little-endian header length, a JSON header, then ``n`` raw bytes
if the header has ``n``. Requests: write_reg {off, val}; read_reg {off}; mem_write {port, addr, n}
+ bytes; mem_read {port, addr, n}; wait {timeout_s, poll} → {done, sim_cycles}; reset {}; quit {}.
Replies carry ``ok`` (and ``error`` when not ok).

Registers go through cocotbext-axi ``AxiLiteMaster`` on ``s_axi_control``. Memories: with the
simulation top of sim/simtop.py (the default) every AXI4 master is served by the behavioural Verilog
memory sim/hdl/axi_mem_model.v (read latency, full speed in the simulator) and the host's buffer
contents go through its $readmemh / $writememh backdoor; with the bare kernel as the top every
``m_axi_*`` port is served by a cocotbext-axi ``AxiRam`` model (with the RTL benches' added read
latency; about 15x slower, docs/results.md). Either way the host code cannot tell it from the card except by speed.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge, Timer

BANK_BYTES = 0x1000_0000


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("host closed the socket")
        buf += chunk
    return bytes(buf)


def recv_msg(sock):
    (hl,) = struct.unpack("<I", _recv_exact(sock, 4))
    hdr = json.loads(_recv_exact(sock, hl))
    data = _recv_exact(sock, hdr["n"]) if hdr.get("n") else b""
    return hdr, data


def send_msg(sock, hdr, data=b""):
    if data:
        hdr = dict(hdr, n=len(data))
    h = json.dumps(hdr).encode()
    sock.sendall(struct.pack("<I", len(h)) + h + data)


def _ports(dut) -> list[str]:
    names = set()
    for h in dut:
        n = h._name
        if n.startswith("m_axi_") and n.endswith("_arvalid"):
            names.add(n[: -len("_arvalid")])
    return sorted(names)


def _ram(dut, prefix, latency):
    try:
        from sim.rtlsim.axi_mem import axi_ram
        return axi_ram(dut, prefix, BANK_BYTES, latency)
    except ImportError:
        from cocotbext.axi import AxiBus, AxiRam
        return AxiRam(AxiBus.from_prefix(dut, prefix), dut.ap_clk, dut.ap_rst_n, reset_active_level=False,
                      size=BANK_BYTES)


_UNKNOWN_DIGITS = str.maketrans("xXzZ", "0000")


class HdlMem:
    """Backdoor of one sim/hdl/axi_mem_model.v instance: beats move through a hex file."""

    def __init__(self, dut, port: str, beat_bytes: int):
        from sim.simtop import mem_file
        self.dut, self.B = dut, beat_bytes
        self.load, self.dump = getattr(dut, f"bd_{port}_load"), getattr(dut, f"bd_{port}_dump")
        self.lo, self.hi = getattr(dut, f"bd_{port}_lo"), getattr(dut, f"bd_{port}_hi")
        self.path = os.path.abspath(mem_file(port))       # the simulator's working directory
        self.load.value = 0
        self.dump.value = 0

    async def _pulse(self, sig, lo: int, hi: int):
        self.lo.value, self.hi.value = lo, hi
        sig.value = 1
        await RisingEdge(self.dut.ap_clk)
        sig.value = 0
        await RisingEdge(self.dut.ap_clk)

    async def _read_beats(self, lo: int, hi: int) -> bytes:
        if os.path.exists(self.path):
            os.unlink(self.path)
        await self._pulse(self.dump, lo, hi)
        with open(self.path) as f:
            words = [ln.split("//")[0].strip() for ln in f]
        # never-written words: Icarus dumps them as x (Verilator as 0); a fresh bank reads as zeros
        words = [w.translate(_UNKNOWN_DIGITS) for w in words if w and not w.startswith("@")]
        n = hi - lo + 1
        if len(words) != n:
            raise RuntimeError(f"memory dump of beats {lo}..{hi} returned {len(words)} words")
        raw = np.frombuffer(bytes.fromhex("".join(w.rjust(2 * self.B, "0") for w in words)), np.uint8)
        return raw.reshape(n, self.B)[:, ::-1].tobytes()

    async def write(self, addr: int, data: bytes):
        if not data:
            return
        B = self.B
        lo, end = addr // B, addr + len(data)
        hi = (end - 1) // B
        buf = bytearray((hi - lo + 1) * B)
        head, tail = addr - lo * B, (hi + 1) * B - end
        if head:
            buf[:B] = await self._read_beats(lo, lo)
        if tail and (hi != lo or not head):
            buf[-B:] = await self._read_beats(hi, hi)
        buf[head:head + len(data)] = data
        n = hi - lo + 1
        hexd = np.frombuffer(np.frombuffer(bytes(buf), np.uint8).reshape(n, B)[:, ::-1].tobytes().hex().encode(),
                             np.uint8).reshape(n, 2 * B)
        text = np.concatenate([hexd, np.full((n, 1), ord("\n"), np.uint8)], axis=1).tobytes()
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(text)
        os.replace(tmp, self.path)
        await self._pulse(self.load, lo, hi)

    async def read(self, addr: int, n: int) -> bytes:
        if n <= 0:
            return b""
        lo, hi = addr // self.B, (addr + n - 1) // self.B
        raw = await self._read_beats(lo, hi)
        off = addr - lo * self.B
        return raw[off:off + n]


async def _reset(dut, cycles=8):
    dut.ap_rst_n.value = 0
    await ClockCycles(dut.ap_clk, cycles)
    dut.ap_rst_n.value = 1
    await ClockCycles(dut.ap_clk, 2)


def _host_gone(sock) -> bool:
    """True when the host closed its end (it exited or was killed, even with SIGKILL): a peek that
    returns no bytes. A host that is alive and silent makes the peek raise BlockingIOError."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@cocotb.test()
async def serve(dut):
    from cocotbext.axi import AxiLiteBus, AxiLiteMaster

    period_ns = float(os.environ.get("ACCLLM_RTL_PERIOD_NS", "10"))
    latency = int(os.environ.get("ACCLLM_RTL_LATENCY", "100"))
    Clock(dut.ap_clk, period_ns, unit="ns").start()
    dut.ap_rst_n.value = 0
    axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.ap_clk, dut.ap_rst_n,
                         reset_active_level=False)
    hdl = hasattr(dut, "bd_ctrl_load")
    if hdl:
        beat = int(os.environ.get("ACCLLM_RTL_BEAT_BYTES", "32"))
        rams = {f"m_axi_{p}": HdlMem(dut, p, beat) for p in os.environ["ACCLLM_RTL_PORTS"].split(",")}
    else:
        rams = {p: _ram(dut, p, latency) for p in _ports(dut)}
    await _reset(dut)
    cycles = 0

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["ACCLLM_RTL_SOCK"])
    send_msg(sock, {"ok": True, "hello": True, "ports": sorted(rams), "period_ns": period_ns})
    while True:
        try:
            hdr, data = recv_msg(sock)
        except (ConnectionError, OSError):
            break
        op = hdr.get("op")
        try:
            if op == "write_reg":
                await axil.write_dword(int(hdr["off"]), int(hdr["val"]) & 0xFFFF_FFFF)
                send_msg(sock, {"ok": True})
            elif op == "read_reg":
                v = await axil.read_dword(int(hdr["off"]))
                send_msg(sock, {"ok": True, "val": int(v)})
            elif op == "mem_write":
                if hdl:
                    await rams[hdr["port"]].write(int(hdr["addr"]) % BANK_BYTES, data)
                else:
                    rams[hdr["port"]].write(int(hdr["addr"]) % BANK_BYTES, data)
                send_msg(sock, {"ok": True})
            elif op == "mem_read":
                a_, n_ = int(hdr["addr"]) % BANK_BYTES, int(hdr["len"])
                out = bytes(await rams[hdr["port"]].read(a_, n_)) if hdl else bytes(rams[hdr["port"]].read(a_, n_))
                send_msg(sock, {"ok": True}, out)
            elif op == "wait":
                deadline = time.monotonic() + float(hdr["timeout_s"])
                poll = int(hdr.get("poll", 32))
                start = cycles
                done = False
                while True:
                    v = await axil.read_dword(0x00)
                    if v & 0x2:
                        done = True
                        break
                    if time.monotonic() >= deadline:
                        break
                    if _host_gone(sock):         # nobody to report to: end the simulation now
                        return
                    # one simulator event per poll (a Timer), the interval growing to 4096 cycles
                    await Timer(poll * period_ns, unit="ns")
                    await RisingEdge(dut.ap_clk)
                    cycles += poll + 1
                    poll = min(2 * poll, 4096)
                send_msg(sock, {"ok": True, "done": done, "sim_cycles": cycles - start})
            elif op == "reset":
                await _reset(dut)
                send_msg(sock, {"ok": True})
            elif op == "quit":
                send_msg(sock, {"ok": True})
                break
            else:
                send_msg(sock, {"ok": False, "error": f"unknown op {op!r}"})
        except (ConnectionError, BrokenPipeError):
            break
        except Exception as e:  # report, keep serving
            try:
                send_msg(sock, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            except OSError:
                break
    sock.close()
    await RisingEdge(dut.ap_clk)
