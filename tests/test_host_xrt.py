"""The xrt backend's logic (argument order, bank placement, sync directions, scalar types) against a
STAND-IN for pyxrt that records every call. This is not a card: the real protocol test is emu vs rtl
(tests/test_host_runtime.py); nothing here has run on an Alveo."""
import subprocess
import sys

import numpy as np
import pytest

from algo.common import AccllmError
from hw import regmap
from hw.config import load_hw


class RecordingPyxrtStandIn:
    """Records calls the way pyxrt would receive them. Memory groups: group g == HBM[g] (the
    connectivity of `accllm package-xo`: weights<p> -> HBM[p], control port -> a bank of its own)."""

    def __init__(self, port_banks: dict[int, int], finish: bool = True):
        self.calls = []
        self.port_banks = port_banks          # argument index -> HBM bank the xclbin connects it to
        self.finish = finish
        rec = self

        class xclBOSyncDirection:
            XCL_BO_SYNC_BO_TO_DEVICE = "to_device"
            XCL_BO_SYNC_BO_FROM_DEVICE = "from_device"

        class ert_cmd_state:
            ERT_CMD_STATE_COMPLETED = "completed"
            ERT_CMD_STATE_TIMEOUT = "timeout"

        class Mem:
            def __init__(self, i):
                self.i = i

            def get_index(self):
                return self.i

            def get_tag(self):
                return f"HBM[{self.i}]"

        class xclbin:
            def __init__(self, path):
                rec.calls.append(("xclbin", path))

            def get_mems(self):
                return [Mem(i) for i in range(32)]

        class device:
            def __init__(self, idx):
                rec.calls.append(("device", idx))
                self.memory = {}

            def load_xclbin(self, x):
                rec.calls.append(("load_xclbin",))
                return "uuid"

        class kernel:
            class cu_access_mode:
                exclusive = "exclusive"

            def __init__(self, dev, uuid, name, mode):
                rec.calls.append(("kernel", name, mode))

            def group_id(self, i):
                rec.calls.append(("group_id", i))
                return rec.port_banks[i]

        class bo:
            class flags:
                normal = "normal"
            next_addr = [0x4000_0000]

            def __init__(self, dev, size, flags, group):
                self.size, self.group = size, group
                self.host = np.zeros(size, np.uint8)
                self.dev_mem = np.zeros(size, np.uint8)
                self.addr = bo.next_addr[0]
                bo.next_addr[0] += 1 << 20
                rec.calls.append(("bo", size, flags, group))

            def address(self):
                return self.addr

            def write(self, data, offset):
                d = np.asarray(data).view(np.uint8)
                self.host[offset:offset + d.size] = d
                rec.calls.append(("bo.write", self.group, offset, d.size))

            def read(self, size, offset):
                rec.calls.append(("bo.read", self.group, offset, size))
                return self.host[offset:offset + size].view(np.int8).copy()

            def sync(self, direction, size, offset):
                rec.calls.append(("bo.sync", self.group, direction, size, offset))
                if direction == "to_device":
                    self.dev_mem[offset:offset + size] = self.host[offset:offset + size]
                else:
                    self.host[offset:offset + size] = self.dev_mem[offset:offset + size]

        class run:
            def __init__(self, k):
                self.args = {}
                rec.calls.append(("run",))

            def set_arg(self, i, v):
                if not isinstance(v, (bo, int)) or (isinstance(v, int) and not -2**31 <= v < 2**31):
                    raise TypeError("pyxrt stand-in: only bo and 32-bit int (as the real binding)")
                self.args[i] = v
                rec.calls.append(("run.set_arg", i, v.group if isinstance(v, bo) else v))

            def start(self):
                rec.calls.append(("run.start",))

            def wait(self, ms):
                rec.calls.append(("run.wait", ms))
                return "completed" if rec.finish else "timeout"

        self.xclBOSyncDirection, self.ert_cmd_state = xclBOSyncDirection, ert_cmd_state
        self.xclbin, self.device, self.kernel, self.bo, self.run = xclbin, device, kernel, bo, run


@pytest.fixture()
def hw():
    return load_hw("sim-small")


def _banks(hw):
    # argument index -> bank, as the package-xo connectivity places them
    from host.cmd_package_xo import port_banks
    pb = port_banks(hw)
    return {i: pb[a.port][0] for i, a in enumerate(regmap.arguments(hw)) if a.port}


def _device(hw, tmp_path, finish=True):
    from host.backends.xrt import XrtDevice
    x = tmp_path / "k.xclbin"
    x.write_bytes(b"stand-in")
    px = RecordingPyxrtStandIn(_banks(hw), finish=finish)
    return XrtDevice(hw, xclbin=str(x), pyxrt_module=px), px


def test_xrt_argument_order_banks_and_sync(hw, tmp_path):
    from host.cmd_package_xo import port_banks
    dev, px = _device(hw, tmp_path)
    banks = {p: lo for p, (lo, hi) in port_banks(hw).items()}
    bufs = {"program": dev.alloc(256, port="m_axi_ctrl", bank=banks["m_axi_ctrl"], name="program"),
            "kv": dev.alloc(4096, port="m_axi_ctrl", bank=banks["m_axi_ctrl"], name="kv"),
            "io": dev.alloc(1024, port="m_axi_ctrl", bank=banks["m_axi_ctrl"], name="io")}
    for p in range(hw.weight_ports):
        bufs[f"weights{p}"] = dev.alloc(512, port=f"m_axi_w{p}", bank=banks[f"m_axi_w{p}"], name=f"w{p}")
    # bank placement: every bo is created in the group of the first argument on its port
    bo_groups = [c[3] for c in px.calls if c[0] == "bo"]
    assert bo_groups == [banks["m_axi_ctrl"]] * 3 + [banks[f"m_axi_w{p}"] for p in range(hw.weight_ports)]
    # sync directions: upload is write then sync to device; download is sync from device then read
    px.calls.clear()
    bufs["io"].upload(np.arange(16, dtype=np.uint8), offset=32)
    assert [c[0] for c in px.calls] == ["bo.write", "bo.sync"]
    assert px.calls[1][2:] == ("to_device", 16, 32)
    px.calls.clear()
    assert bufs["io"].download(16, offset=32) == bytes(range(16))
    assert [c[0] for c in px.calls] == ["bo.sync", "bo.read"] and px.calls[0][2:] == ("from_device", 16, 32)
    # argument order: regmap order; u32 >= 2**31 passed as a C int; outputs never passed
    for name, b in bufs.items():
        dev.set_arg(name, b)
    dev.set_arg("program_len", 16)
    dev.set_arg("position", 0xFFFF_FFF0)
    dev.set_arg("n_tokens", 1)
    dev.set_arg("flags", 3)
    dev.set_arg("entry", 0)
    px.calls.clear()
    dev.start()
    assert dev.wait(1.0) == regmap.STATUS_OK
    sets = [c for c in px.calls if c[0] == "run.set_arg"]
    # argument i of kernel.xml = the i-th argument of the register map (outputs keep their index)
    names = [a.name for a in regmap.arguments(hw) if a.kind != "ro32"]
    assert [c[1] for c in sets] == [i for i, a in enumerate(regmap.arguments(hw)) if a.kind != "ro32"]
    by_name = dict(zip(names, [c[2] for c in sets]))
    assert by_name["position"] == 0xFFFF_FFF0 - 2**32 and by_name["flags"] == 3
    assert by_name["io"] == banks["m_axi_ctrl"] and by_name["weights1"] == banks["m_axi_w1"]
    assert px.calls[-2][0] == "run.start" and px.calls[-1] == ("run.wait", 1000)
    assert dev.cycles() is None             # pyxrt has no read_register: unknown, not invented


def test_xrt_bad_input(hw, tmp_path):
    dev, px = _device(hw, tmp_path)
    with pytest.raises(AccllmError, match="bank"):
        dev.alloc(64, port="m_axi_w0", bank=7)          # the xclbin connects w0 elsewhere
    with pytest.raises(AccllmError, match="not set before start"):
        dev.start()
    with pytest.raises(AccllmError, match="32-bit"):
        dev.set_arg("position", 2**32)
    with pytest.raises(AccllmError, match="does not exist"):
        from host.backends.xrt import XrtDevice
        XrtDevice(hw, xclbin=str(tmp_path / "missing.xclbin"), pyxrt_module=px)


def test_xrt_timeout_leaves_device_reusable(hw, tmp_path):
    from host.cmd_package_xo import port_banks
    from hw.device import DeviceTimeout
    dev, px = _device(hw, tmp_path, finish=False)
    banks = {p: lo for p, (lo, hi) in port_banks(hw).items()}
    for a in regmap.arguments(hw):
        if a.kind == "ptr":
            dev.set_arg(a.name, dev.alloc(64, port=a.port, bank=banks[a.port], name=a.name))
        elif a.kind == "u32":
            dev.set_arg(a.name, 1)
    dev.start()
    with pytest.raises(DeviceTimeout, match="registers: .*program_len=0x1"):
        dev.wait(0.01)
    px.finish = True
    dev.start()
    assert dev.wait(0.01) == 0


def test_xrt_without_xrt_is_one_clear_line():
    code = ("import sys; sys.modules['pyxrt'] = None\n"
            "from host.backends.xrt import import_pyxrt\n"
            "import_pyxrt()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "pyxrt" in r.stderr
