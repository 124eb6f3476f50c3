"""RTL unit benches (cocotb, Verilator by default; Icarus where fast): the special-function
unit, the KV-cache unit, the attention flow and the top-k engine, each against hw/numerics.py /
algo/topk.py."""
from pathlib import Path

import pytest

from sim.toolchain import run_cocotb

TB = Path(__file__).resolve().parents[1] / "sim" / "tb"

SFU_PARAMS = dict(max_d=256, max_hd=64, max_n=128, max_v=4096)


def _run(tmp_path, simulator, top, name, unit, env=None, testcase=None):
    from amaranth.back import verilog
    v = tmp_path / f"{name}.v"
    v.write_text(verilog.convert(top, name=name, emit_src=False))
    run_cocotb(simulator=simulator, toplevel=name, sources=[v], test_module=f"test_{unit}", test_dir=TB / unit,
               name=name, extra_env={k: str(x) for k, x in (env or {}).items()}, results_dir=tmp_path,
               testcase=testcase)


@pytest.mark.parametrize("simulator", ["verilator"])
def test_sfu(simulator, tmp_path):
    from hw.rtl.sfu import SFU
    p = SFU_PARAMS
    _run(tmp_path, simulator, SFU(**p), "sfu_top", "sfu",
         env=dict(MAX_D=p["max_d"], MAX_HD=p["max_hd"], MAX_N=p["max_n"]))


@pytest.mark.parametrize("simulator", ["verilator", "icarus"])
def test_topk(simulator, tmp_path):
    from hw.rtl.topk import TopK
    _run(tmp_path, simulator, TopK(256), "topk_top", "topk", env=dict(MAX_N=256))


def test_topk_64bit_scores(tmp_path):
    """The width SpAtten's cumulative importance needs (63-bit unsigned values, docs/numerics.md)."""
    from hw.rtl.topk import TopK
    _run(tmp_path, "verilator", TopK(128, width=64), "topk64_top", "topk", env=dict(MAX_N=128, WIDTH=64))


@pytest.mark.parametrize("simulator", ["verilator"])
def test_kvcache(simulator, tmp_path):
    from hw.rtl.kvcache import KVCacheUnit
    _run(tmp_path, simulator, KVCacheUnit(max_context=2048, max_group=128), "kvcache_top", "kvcache")


@pytest.mark.parametrize("simulator,lanes", [("verilator", 16), ("verilator", 1)])
def test_attention(simulator, lanes, tmp_path):
    """The core with the kernel's 16 channels per cycle, and with one (the same bench packs the streams
    for the core's width)."""
    from hw.rtl.attention import AttentionCore
    _run(tmp_path, simulator, AttentionCore(max_hd=64, max_n=64, lanes=lanes), "attention_top", "attention")
