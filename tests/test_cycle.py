"""Cycle model and `accllm perf`."""
from __future__ import annotations

import json

from algo.models import KNOWN_CONFIGS
from algo.recipe import load_recipe
from hw.config import load_hw
from sim.cycle import CycleModel, project


def test_llama2_7b_u280_accllm_target():
    r = project(dict(KNOWN_CONFIGS["llama2-7b"], name="llama2-7b"), load_recipe("accllm"), load_hw("u280"))
    assert r["decode_tokens_per_s"] >= 220
    assert r["fraction_of_roofline"] >= 0.85
    assert r["decode_tokens_per_s"] <= r["roofline_tokens_per_s"]
    b = r["bytes_per_token_breakdown"]
    assert b["kv_read"] > 0 and b["lm_head"] > 0
    assert r["validated"] is False


def test_roofline_caps_and_ports():
    # a 300 MHz clock with 512-bit ports cannot beat the HBM's 460.8 GB/s
    fast = CycleModel(load_hw("u280", ["clock_mhz=300"]))
    assert abs(fast.bytes_per_cycle * 300e6 / 0.9 - 460.8e9) < 1e6
    # 256-bit ports at 225 MHz reach only half of it
    half = CycleModel(load_hw("u280", ["port_width_bits=256"]))
    assert abs(half.bytes_per_cycle * 225e6 / 0.9 - 230.4e9) < 1e6
    # too few reads in flight to hide the latency: slower streams
    slow = CycleModel(load_hw("u280", ["outstanding_reads=2"]))
    assert slow.stream_cycles(1 << 20) > CycleModel(load_hw("u280")).stream_cycles(1 << 20)


def test_more_context_costs_more():
    shape = dict(KNOWN_CONFIGS["llama2-7b"], name="llama2-7b")
    a = project(shape, load_recipe("accllm"), load_hw("u280"), context=16)
    b = project(shape, load_recipe("accllm"), load_hw("u280"), context=4000)
    assert b["bytes_per_token"] > a["bytes_per_token"]
    assert b["context_kept_tokens"] == 1028          # Λ caps the kept tokens at S + W


def test_spatten_projection_reads_fewer_kv_bytes():
    """SpAtten in the projection: from the start layer only sinks + recent + the kept share of the older
    tokens are read (by the kept heads), the importance state and TOPK cost bytes, and layers before the
    start layer read everything."""
    shape = dict(KNOWN_CONFIGS["llama2-7b"], name="llama2-7b")
    base = project(shape, load_recipe("accllm"), load_hw("u280"))
    sp = project(shape, load_recipe("accllm", sets=["token_keep=0.5", "head_keep=0.5"]), load_hw("u280"))
    b0, b1 = base["bytes_per_token_breakdown"], sp["bytes_per_token_breakdown"]
    assert b0["spatten_state"] == 0 < b1["spatten_state"] < 0.05 * b1["kv_read"]
    assert b1["kv_read"] < 0.5 * b0["kv_read"]
    n = sp["spatten"]["tokens_read_per_layer"]
    assert n[:2] == [1028, 1028] and n[2] == 4 + 128 + (1028 - 4 - 128) // 2
    assert sp["spatten"]["heads_per_layer"][2] == 16
    assert sp["decode_tokens_per_s"] > base["decode_tokens_per_s"]
    assert sp["bytes_per_token"] < base["bytes_per_token"]


def test_perf_cli_json_and_plot(tmp_path, capsys):
    from host.cli import main
    png = tmp_path / "roof.png"
    assert main(["perf", "--model", "llama2-7b", "--hw", "u280", "--recipe", "accllm", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("decode_tokens_per_s", "roofline_tokens_per_s", "bytes_per_token"):
        assert k in out
    assert png.stat().st_size > 1000
    assert main(["perf", "--model", "smollm2-135m", "--hw", "u280"]) == 0
    txt = capsys.readouterr().out
    assert "NOT validated" in txt and "RTL as built" in txt
    assert main(["perf", "--model", "nonexistent-model"]) == 2
