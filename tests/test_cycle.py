"""Cycle model and `accllm perf`."""
from __future__ import annotations

import json

import pytest

from algo.models import KNOWN_CONFIGS
from algo.recipe import load_recipe
from hw.config import load_hw
from sim.cycle import CycleModel, project


def test_llama2_7b_u280_accllm_projection():
    """The projection's figures agree with their definitions (bandwidth bound, clock / cycles); the
    target throughput itself is the model's output, not something a test can hold it to."""
    r = project(dict(KNOWN_CONFIGS["llama2-7b"], name="llama2-7b"), load_recipe("accllm"), load_hw("u280"))
    assert r["decode_tokens_per_s"] <= r["roofline_tokens_per_s"]
    b = r["bytes_per_token_breakdown"]
    assert b["kv_read"] > 0 and b["lm_head"] > 0
    assert r["validated"] is False
    assert abs(sum(b.values()) - r["bytes_per_token"]) <= len(b)          # each entry rounded down
    assert r["hbm_peak_bytes_per_s"] == 32 * 64 * 225e6 == 460.8e9      # 32 ports x 512 bit x 225 MHz: the HBM's peak
    assert r["roofline_tokens_per_s"] == pytest.approx(460.8e9 / r["bytes_per_token"], rel=1e-9)
    assert r["decode_tokens_per_s"] == pytest.approx(225e6 / r["cycles_per_token"], rel=1e-5)


def test_projection_bytes_match_a_hand_count():
    """Bytes per decode token of the tiny model (H 128, I 256, 2 layers, 4 query / 2 KV heads of 32,
    vocabulary 49152) under the accllm recipe on the U280, counted by hand from the documented layouts:
    row records of hw/memmap.RowRecord (shift, scales, zeros, 2:4 indices, codes; each section padded to
    16 bytes), N rows rounded up to the 32 ports plus 64 bytes per port, the KV layout of
    hw/memmap.kv_layout, Λ attention keeping sinks + window."""
    r = project(dict(KNOWN_CONFIGS["tiny"], name="tiny"), load_recipe("accllm"), load_hw("u280"))
    P = 32
    # W2, groups of 64 (1-byte scales at scale_bits 8), 2:4
    rec_k128 = 16 + 16 + 16 + 16 + 16      # 2 scales, 4 bits of zeros, 32 x 3-bit indices = 12 B, 64 kept x 2 bit = 16 B
    rec_k256 = 16 + 16 + 16 + 32 + 32      # 4 scales, 1 B of zeros, 64 x 3-bit indices = 24 B, 128 kept x 2 bit = 32 B
    rec_head = 16 + 16 + 16 + 0 + 128      # lm_head: 8-bit, dense (high precision, not pruned): 128 codes
    layer = ((4 + 2 * 2) * 32 * rec_k128 + 64 * P      # q, k, v projections: N = (4 + 2 x 2) heads x 32
             + 128 * rec_k128 + 64 * P                  # o
             + 2 * 256 * rec_k128 + 64 * P              # gate and up
             + 128 * rec_k256 + 64 * P)                 # down: K = 256
    kept = 4 + 1024                                     # sinks + window
    k_slot, v_slot = 32 // 2, 32 // 2 + 8               # 4-bit codes; V: one 4-byte group word, padded to 8
    want = {"linear_weights": 2 * layer, "lm_head": 49152 * rec_head + 64 * P,
            "kv_read": 2 * 2 * kept * (k_slot + v_slot),
            "kv_write": 2 * 2 * (32 + 4),               # per layer and KV head: K and V codes + the group word
            "spatten_state": 0, "embedding": 4 * 128}
    assert r["bytes_per_token_breakdown"] == want
    assert r["bytes_per_token"] == sum(want.values())
    assert r["roofline_tokens_per_s"] == pytest.approx(460.8e9 / sum(want.values()), rel=1e-12)


def _tps(model, sets=(), recipe_sets=()):
    return project(dict(KNOWN_CONFIGS[model], name=model), load_recipe("accllm", sets=list(recipe_sets)),
                   load_hw("u280", list(sets)))


def test_projection_is_monotone():
    """More weight ports or a faster clock never make a token slower; more weight bits never make it
    faster or smaller; a bigger model is never faster; no projection beats its bandwidth bound."""
    def not_slower(rs):
        t = [r["decode_tokens_per_s"] for r in rs]
        return all(b >= a * (1 - 1e-12) for a, b in zip(t, t[1:])), t

    models = ["tiny", "smollm2-135m", "llama2-7b"]          # increasing size
    for m in models:
        rs = [_tps(m, [f"weight_ports={p}"]) for p in (1, 2, 4, 8, 16, 32)]
        ok, t = not_slower(rs)
        assert ok, (m, "ports", t)
        assert all(r["decode_tokens_per_s"] <= r["roofline_tokens_per_s"] for r in rs), m
        ok, t = not_slower([_tps(m, [f"clock_mhz={c}"]) for c in (100, 150, 225, 300, 450)])
        assert ok, (m, "clock", t)
        rs = [_tps(m, recipe_sets=[f"weight_bits={w}"]) for w in (8, 4, 3, 2)]
        ok, t = not_slower(rs)
        assert ok, (m, "weight bits", t)
        assert [r["bytes_per_token"] for r in rs] == sorted((r["bytes_per_token"] for r in rs), reverse=True), m
    for p in (1, 32):
        ok, t = not_slower([_tps(m, [f"weight_ports={p}"]) for m in reversed(models)])
        assert ok, ("model size", p, t)


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
