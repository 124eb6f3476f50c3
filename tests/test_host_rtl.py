"""The rtl backend's plumbing (simulator subprocess, socket protocol, registers on s_axi_control,
ap_ctrl_hs, timeout with register dump and reset, session lock, Ctrl-C, no subprocess left) on the
control-slave unit top hw.rtl.tops.ControlTop (s_axi_control with a stand-in execution: busy for n_tokens cycles, then
STATUS = position & 0xff). The whole-kernel protocol test (emu vs rtl tokens) is in
tests/test_host_runtime.py."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from algo.common import AccllmError
from hw.config import load_hw

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def control_rtl(tmp_path_factory):
    from hw.rtl.tops import ControlTop, to_verilog
    d = tmp_path_factory.mktemp("control_rtl")
    (d / "accllm_kernel.v").write_text(to_verilog(ControlTop(load_hw("sim-small")), "accllm_kernel"))
    return d


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_rtl_device_registers_runs_timeout_and_close(control_rtl):
    from hw import regmap
    from sim.rtlsim.device import RtlDevice
    from hw.device import DeviceBusy, DeviceError, DeviceTimeout
    hw = load_hw("sim-small")
    dev = RtlDevice(hw, rtl_dir=str(control_rtl), check_ports=False, progress=False)
    pgid = dev.proc.pid
    try:
        # one simulated memory per AXI port: buffers of a port in different banks must not alias
        from hw.device import BANK_BYTES
        b0 = dev.alloc(100, port="m_axi_ctrl", bank=0, name="a")
        b1 = dev.alloc(100, port="m_axi_ctrl", bank=1, name="b")
        assert b0.address // BANK_BYTES == 0 and b1.address // BANK_BYTES == 1
        assert b0.address % BANK_BYTES != b1.address % BANK_BYTES
        with dev.session("first"):
            with pytest.raises(DeviceBusy, match="first"):
                with dev.session("second"):
                    pass
            dev.set_arg("position", 0)
            dev.set_arg("n_tokens", 300)
            dev.start()
            assert dev.wait(60) == regmap.STATUS_OK
            assert 300 <= dev.cycles() <= 310
            assert dev.read_arg("n_tokens") == 300
            # a non-zero status comes back as a clear error with the register dump
            with pytest.raises(DeviceError, match="status 5 .*KV region"):
                dev.run(60, position=5, n_tokens=10)
            # a run that does not finish: timeout with the registers, then the device is reusable
            dev.set_arg("position", 0)
            dev.set_arg("n_tokens", 2**31)
            dev.start()
            with pytest.raises(DeviceTimeout, match=r"registers: AP_CTRL=.* n_tokens=0x80000000"):
                dev.wait(0.5)
            assert dev.read_register(regmap.AP_CTRL) & regmap.AP_IDLE
            assert dev.run(60, position=0, n_tokens=20) == 0
    finally:
        dev.close()
    assert dev.proc.poll() is not None
    assert _gone(pgid), "simulator process group still alive after close()"


def _holding_host(control_rtl, tmp_path, on_interrupt: str = "", deadline_s: float = 600.0):
    """A host process that starts a run that never ends on the control kernel and waits in wait();
    returns (process, the simulator's process group) once the host has sent the simulator its wait
    request (it prints "waiting" then), i.e. the simulation of the run is going on and the host is
    blocked on the reply. *deadline_s* covers the host's start-up, including a Verilator build."""
    body = f"""
        with dev.session("holding host"):
            dev.set_arg("n_tokens", 2**31)
            dev.start()
            dev.wait(600)"""
    if on_interrupt:
        body = "\ntry:" + textwrap.indent(body, "    ") + "\nexcept KeyboardInterrupt:\n" + textwrap.indent(on_interrupt, "    ")
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys
        # as in a terminal: a host started in the background by a non-interactive shell (CI running
        # `make test &`) inherits SIGINT ignored, and Ctrl-C would then never reach it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from hw.config import load_hw
        import sim.rtlsim.device as rtl_device
        from sim.rtlsim.device import RtlDevice
        dev = RtlDevice(load_hw("sim-small"), rtl_dir={str(control_rtl)!r}, check_ports=False, progress=False)
        print(dev.proc.pid, flush=True)
        _send = rtl_device.send_msg
        def send_and_tell(sock, hdr, data=b""):
            _send(sock, hdr, data)
            if hdr.get("op") == "wait":       # the request is out: the host now blocks on the reply
                print("waiting", flush=True)
        rtl_device.send_msg = send_and_tell
    """) + textwrap.dedent(body) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=REPO)
    lines, waiting = [], threading.Event()

    def read_until_waiting():               # stops at "waiting": the rest is left to communicate()
        for line in p.stdout:
            lines.append(line.strip())
            if lines[-1] == "waiting":
                break
        waiting.set()                       # also at EOF: the host ended early

    threading.Thread(target=read_until_waiting, daemon=True).start()
    if not waiting.wait(deadline_s) or lines[-1:] != ["waiting"]:
        p.kill()
        _, err = p.communicate(timeout=30)
        pytest.fail(f"the holding host did not reach wait() within {deadline_s:g} s (exit {p.returncode}, "
                    f"output {lines}):\n{err[-3000:]}")
    return p, int(lines[0])


def _wait_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not _gone(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def test_rtl_ctrl_c_leaves_no_subprocess(control_rtl, tmp_path):
    p, pgid = _holding_host(control_rtl, tmp_path,
                            on_interrupt='dev.reset()\nprint("interrupted", flush=True)\nsys.exit(130)\n')
    try:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:             # the test failed: do not leave the host (and its simulation) running
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in out
    assert _wait_gone(pgid, 5), "the simulator survived Ctrl-C"


def test_rtl_killed_host_leaves_no_simulator(control_rtl, tmp_path):
    """A host killed without any chance to clean up (SIGKILL, or a CI timeout's SIGTERM) while it waits
    for a run: the simulator notices the closed socket and ends, instead of simulating on."""
    p, pgid = _holding_host(control_rtl, tmp_path)
    p.kill()
    p.communicate(timeout=30)
    assert _wait_gone(pgid, 30), "the simulator kept running after its host was killed"


def test_rtl_missing_verilog_is_clear(tmp_path):
    from sim.rtlsim.device import RtlDevice
    with pytest.raises(AccllmError, match="no Verilog"):
        RtlDevice(load_hw("sim-small"), rtl_dir=str(tmp_path), progress=False)
