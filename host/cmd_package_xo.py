"""``accllm package-xo``: what a user with Vitis needs to turn the generated Verilog into an xclbin."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from algo.common import AccllmError, atomic_directory, atomic_write_text

DESCRIPTION = """Write the files a user with Vivado/Vitis needs to build the card's bitstream (xclbin) for a
compiled package: the generated Verilog (from `accllm build-rtl` for the package's hardware
configuration), kernel.xml, a Vivado Tcl script that packages them with `package_xo`, a v++
connectivity file whose `sp=` lines spread the AXI masters over the U280's 32 HBM pseudo-channels
(the same banks the package's memory map uses), and a README with the card flow step by step.

Nothing here needs Vitis; running the Tcl and v++ does (not done by this command)."""
EPILOG = """example:
  accllm package-xo --package build/smollm2 --out build/xo
  cd build/xo && vivado -mode batch -source package_xo.tcl && v++ -l -t hw --platform $PLATFORM \\
      --config connectivity.cfg -o accllm.xclbin accllm_kernel.xo"""

KERNEL = "accllm_kernel"
PLATFORM = "xilinx_u280_gen3x16_xdma_1_202211_1"


def add_arguments(p) -> None:
    p.add_argument("--package", required=True, metavar="DIR", help="compiled package (compile-model --hw ...)")
    p.add_argument("--out", required=True, metavar="XO", help="output directory")
    p.add_argument("--rtl", default=None, metavar="DIR", help="existing `accllm build-rtl` output for the "
                   "package's configuration (default: build it now)")
    p.add_argument("--platform", default=PLATFORM, help="Vitis platform for the README's v++ line "
                   "(default %(default)s)")


def port_banks(hw, memmap: dict | None = None) -> dict[str, tuple[int, int]]:
    """HBM pseudo-channels (lo, hi) every AXI master port is connected to. From the package's memory
    map where it places buffers (a port whose buffers sit in several banks gets the range lo..hi, as
    `sp=...:HBM[lo:hi]`), else: weights port p -> HBM[p], the control port (program, KV cache, I/O)
    -> HBM[weight_ports % 32]."""
    from hw import regmap
    ports = sorted({a.port for a in regmap.arguments(hw) if a.port})
    default = {p: (int(p[len("m_axi_w"):]) % 32 if p.startswith("m_axi_w") else hw.weight_ports % 32) for p in ports}
    seen: dict[str, list[int]] = {}
    for b in _memmap_buffers(memmap):
        port, bank = b.get("port"), b.get("bank")
        if port in default and isinstance(bank, int):
            if not 0 <= bank < 32:
                raise AccllmError(f"memory map places buffer {b.get('name')!r} in HBM bank {bank}; the U280 has 0..31")
            seen.setdefault(port, []).append(bank)
    return {p: ((min(seen[p]), max(seen[p])) if p in seen else (default[p], default[p])) for p in ports}


def hbm_tag(lo_hi: tuple[int, int]) -> str:
    lo, hi = lo_hi
    return f"HBM[{lo}]" if lo == hi else f"HBM[{lo}:{hi}]"


def _memmap_buffers(memmap) -> list[dict]:
    if not memmap:
        return []
    bufs = memmap.get("buffers", [])
    if isinstance(bufs, dict):
        return [dict(v, name=k) for k, v in bufs.items() if isinstance(v, dict)]
    return [b for b in bufs if isinstance(b, dict)]


def connectivity_cfg(hw, banks: dict[str, int]) -> str:
    lines = ["# v++ --link connectivity for the accllm kernel (written by `accllm package-xo`)",
             f"# hardware configuration {hw.name}: {hw.weight_ports} weight ports x {hw.port_width_bits} bit "
             f"at {hw.clock_mhz:g} MHz",
             "[connectivity]", f"nk={KERNEL}:1:{KERNEL}_1"]
    for port in sorted(banks, key=lambda p: (not p.startswith("m_axi_w"), len(p), p)):
        lines.append(f"sp={KERNEL}_1.{port}:{hbm_tag(banks[port])}")
    lines += ["", "[clock]", f"freqHz={int(hw.clock_mhz * 1e6)}:{KERNEL}_1", ""]
    return "\n".join(lines)


def package_xo_tcl(verilog: list[str], hw) -> str:
    files = " ".join(f"[file join $here rtl {v}]" for v in verilog)
    return f"""# Package the accllm RTL kernel as a Vitis .xo (written by `accllm package-xo`).
# Run: vivado -mode batch -source package_xo.tcl      (Vivado/Vitis 2022.2 or newer)
set here [file dirname [file normalize [info script]]]
set ip_dir [file join $here ip]
set xo [file join $here {KERNEL}.xo]
file delete -force $ip_dir $xo [file join $here tmp_pack]
create_project -force tmp_pack [file join $here tmp_pack] -part xcu280-fsvh2892-2L-e
add_files -norecurse [list {files}]
set_property top {KERNEL} [current_fileset]
update_compile_order -fileset sources_1
ipx::package_project -root_dir $ip_dir -vendor accllm.org -library accllm -taxonomy /KernelIP -import_files -set_current false
ipx::unload_core [file join $ip_dir component.xml]
ipx::edit_ip_in_project -upgrade true -name tmp_edit -directory [file join $here tmp_pack] [file join $ip_dir component.xml]
set core [ipx::current_core]
set_property sdx_kernel true $core
set_property sdx_kernel_type rtl $core
set_property ipi_drc {{ignore_freq_hz true}} $core
set_property vitis_drc {{ctrl_protocol ap_ctrl_hs}} $core
# every AXI4 master and the control slave share ap_clk / ap_rst_n
ipx::associate_bus_interfaces -busif s_axi_control -clock ap_clk $core
{chr(10).join(f"ipx::associate_bus_interfaces -busif {p} -clock ap_clk $core" for p in _ports(hw))}
set_property xpm_libraries {{XPM_CDC XPM_MEMORY XPM_FIFO}} $core
set_property supported_families {{ }} $core
set_property auto_family_support_level level_2 $core
ipx::update_checksums $core
ipx::save_core $core
close_project -delete
package_xo -xo_path $xo -kernel_name {KERNEL} -ip_directory $ip_dir -kernel_xml [file join $here kernel.xml] -ctrl_protocol ap_ctrl_hs
puts "wrote $xo"
"""


def _ports(hw) -> list[str]:
    from hw import regmap
    return sorted({a.port for a in regmap.arguments(hw) if a.port}, key=lambda p: (len(p), p))


def readme(hw, pkg: str, banks: dict[str, int], platform: str) -> str:
    return f"""# Building and running the accllm kernel on an Alveo U280

Written by `accllm package-xo --package {pkg}`. Hardware configuration: **{hw.name}**
({hw.weight_ports} weight ports x {hw.port_width_bits} bit, {hw.clock_mhz:g} MHz kernel clock).

What is here:
- `rtl/` — the generated Verilog (Amaranth → `accllm build-rtl`), top module `{KERNEL}`;
- `kernel.xml` — the Vitis RTL-kernel description: `s_axi_control` register map, AXI4 masters;
- `package_xo.tcl` — packages the Verilog as IP and calls `package_xo` → `{KERNEL}.xo`;
- `connectivity.cfg` — `nk=` and `sp=` lines: {len(banks)} AXI masters over the HBM
  pseudo-channels ({', '.join(f'{p}→{hbm_tag(b)}' for p, b in sorted(banks.items(), key=lambda x: x[1]))}),
  the same banks the package's memory map allocates its buffers in;
- this README.

## Steps (need Vivado/Vitis 2022.2+, XRT and the U280 platform `{platform}`)

1. `source /tools/Xilinx/Vitis/<version>/settings64.sh && source /opt/xilinx/xrt/setup.sh`
2. `vivado -mode batch -source package_xo.tcl` → `{KERNEL}.xo`
3. `v++ -l -t hw --platform {platform} --config connectivity.cfg -o accllm.xclbin {KERNEL}.xo`
   (hours; for a quick check of the flow use `-t hw_emu` and `XCL_EMULATION_MODE=hw_emu`)
4. `.venv/bin/pip install` nothing more: pyxrt comes with XRT (`/opt/xilinx/xrt/python`), on
   `PYTHONPATH` after `setup.sh`.
5. `.venv/bin/accllm run --package {pkg} --backend xrt --xclbin accllm.xclbin --prompt "..." --max-new-tokens 32`

The host runtime allocates every buffer with `kernel.group_id(i)` of the argument's port, so XRT
places it in the bank of `connectivity.cfg`; it refuses to run if the xclbin connects a port to a
different bank than the package expects.

## What has been run

Nothing in this directory has been run on a card or through Vivado/Vitis by the accllm authors:
there was no card and no Vitis licence in the development environment. The same Verilog has been
simulated under Verilator (`--backend rtl`), and the `xrt` backend's calls (argument order, bank
placement, sync directions) are tested against a recording stand-in for pyxrt, not against XRT.
"""


def run(args) -> int:
    from hw.config import hw_from_dict
    from host.runtime import read_package_manifest

    pkg = Path(args.package)
    manifest = read_package_manifest(pkg)
    if "hw" not in manifest:
        raise AccllmError(f"package {pkg} was not compiled for hardware (no 'hw' in manifest.json); run "
                          f"compile-model with --hw u280 (or sim-small)")
    hw = hw_from_dict(manifest["hw"])
    memmap = None
    if (pkg / "memmap.json").is_file():
        memmap = json.loads((pkg / "memmap.json").read_text())
    banks = port_banks(hw, memmap)
    out = Path(args.out)
    with atomic_directory(out) as tmp:
        rtl_dst = tmp / "rtl"
        if args.rtl:
            src = Path(args.rtl)
            if not src.is_dir():
                raise AccllmError(f"--rtl {src} is not a directory (expected `accllm build-rtl --out` output)")
        else:
            src = tmp / "build-rtl"
            _build_rtl(hw, src)
        verilog = sorted(p.name for p in src.iterdir() if p.suffix in (".v", ".sv"))
        if not verilog:
            raise AccllmError(f"{src} has no Verilog (*.v); expected `accllm build-rtl --out` output")
        if not (src / "kernel.xml").is_file():
            raise AccllmError(f"{src} has no kernel.xml; expected `accllm build-rtl --out` output")
        rtl_dst.mkdir()
        for v in verilog:
            shutil.copy2(src / v, rtl_dst / v)
        shutil.copy2(src / "kernel.xml", tmp / "kernel.xml")
        for extra in ("regmap.json", "resources.json"):
            if (src / extra).is_file():
                shutil.copy2(src / extra, tmp / extra)
        if not args.rtl:
            shutil.rmtree(src)
        atomic_write_text(tmp / "package_xo.tcl", package_xo_tcl(verilog, hw))
        atomic_write_text(tmp / "connectivity.cfg", connectivity_cfg(hw, banks))
        atomic_write_text(tmp / "README.md", readme(hw, str(pkg), banks, args.platform))
    print(f"wrote {out}/: package_xo.tcl, kernel.xml, connectivity.cfg ({len(banks)} sp= lines), "
          f"rtl/ ({len(verilog)} Verilog files), README.md")
    return 0


def _build_rtl(hw, dst: Path) -> None:
    """The kernel's Verilog, kernel.xml and regmap.json for *hw* into *dst* (what `accllm build-rtl` writes)."""
    from hw.build_rtl import build
    build(hw, dst)
