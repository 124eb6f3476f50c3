"""Tests of the compression algorithms: N:M pruning, Λ-shaped attention, SpAtten, top-k (tiny model, seconds)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quant.blocktune import tune_block
from hypothesis import given, settings, strategies as st

from algo.attention import check_fits, generate, make_cache_factory
from algo.common import AccllmError
from algo.eval import HFScorer, perplexity_stream
from algo.models import load_model
from algo.prune import index_bits, mask_from_pattern_indices, nm_mask, nm_patterns, pattern_indices, prune_model
from algo.recipe import load_recipe
from algo.topk import topk_mask, topk_numpy, topk_reference, topk_torch

ROOT = Path(__file__).resolve().parents[1]
ACCLLM = [str(ROOT / ".venv" / "bin" / "accllm")] if (ROOT / ".venv" / "bin" / "accllm").exists() \
    else [sys.executable, "-m", "host.cli"]


def _ids(n, seed=0, vocab=49152):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ top-k
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=60), st.data())
def test_topk_matches_sort_reference_with_ties(vals, data):
    k = data.draw(st.integers(0, len(vals)))
    ref = topk_reference(vals, k)
    got = topk_numpy(np.array(vals, dtype=np.float32), k)
    assert got.tolist() == ref.tolist()
    got_t = topk_torch(torch.tensor(vals, dtype=torch.float32), k)
    assert got_t.tolist() == ref.tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=200), st.data())
def test_topk_floats(vals, data):
    k = data.draw(st.integers(0, len(vals)))
    assert topk_numpy(np.array(vals, dtype=np.float32), k).tolist() == \
        topk_reference(np.array(vals, dtype=np.float32), k).tolist()


def test_topk_semantics_and_errors():
    # equal scores: the lower position wins
    assert topk_numpy([1.0, 2.0, 2.0, 2.0, 0.0], 2).tolist() == [1, 2]
    assert topk_torch(torch.tensor([5.0, 5.0, 5.0]), 1).tolist() == [0]
    assert topk_mask(torch.tensor([0.0, 3.0, 1.0]), 2).tolist() == [False, True, True]
    assert topk_numpy([float("-inf"), 0.0], 1).tolist() == [1]
    with pytest.raises(AccllmError, match="NaN"):
        topk_numpy([1.0, float("nan")], 1)
    with pytest.raises(AccllmError, match=r"k must lie in \[0, 2\]"):
        topk_numpy([1.0, 2.0], 3)
    with pytest.raises(AccllmError, match="1-D"):
        topk_torch(torch.zeros(2, 2), 1)


# ------------------------------------------------------------------------------------ N:M
def test_nm_mask_and_pattern_encoding():
    assert nm_patterns(2, 4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert (index_bits(2, 4), index_bits(4, 8), index_bits(1, 4)) == (3, 7, 2)
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, 9.0, 0.0, 9.0], [1.0, 1.0, 1.0, 1.0, 2, 1, 2, 1]])
    m = nm_mask(s, 2, 4)
    assert m.tolist() == [[True, True, False, False, False, True, False, True],
                          [True, True, False, False, True, False, True, False]]
    idx = pattern_indices(m, 2, 4)
    assert idx.tolist() == [[0, 4], [0, 1]]
    assert torch.equal(mask_from_pattern_indices(idx, 2, 4), m)
    g = torch.Generator().manual_seed(0)
    for n, mm in [(2, 4), (4, 8), (1, 4)]:
        mask = nm_mask(torch.rand(16, 64, generator=g), n, mm)
        assert torch.equal(mask_from_pattern_indices(pattern_indices(mask, n, mm), n, mm), mask)
    with pytest.raises(AccllmError, match="multiple of M=4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def _check_masks(model, n, m, skip=("lm_head",)):
    pruned = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if name in skip:
                assert not hasattr(mod, "accllm_mask")
                continue
            mask = mod.accllm_mask
            assert mask.dtype == torch.bool and mask.shape == mod.weight.shape
            assert bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all())
            assert bool((mod.weight[~mask] == 0).all())
            pruned += 1
    return pruned


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_methods(method):
    loaded = load_model("tiny")
    calib = torch.stack([_ids(64, s) for s in range(4)])
    r = load_recipe("sparse24", sets=["block_tune_steps=0", f"prune_method={method}"])
    rep = prune_model(loaded.model, r, None if method == "magnitude" else calib, progress=False)
    assert _check_masks(loaded.model, 2, 4) == rep["layers_pruned"] == 14
    assert abs(rep["kept_fraction"] - 0.5) < 1e-9
    if method != "magnitude":
        assert 0 < rep["mean_rel_err"] < 1


def test_sparsegpt_beats_wanda_and_magnitude_on_reconstruction():
    calib = torch.stack([_ids(64, s) for s in range(4)])
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        loaded = load_model("tiny")
        layer = loaded.model.model.layers[0].mlp.down_proj
        w0 = layer.weight.detach().clone()
        r = load_recipe("sparse24", sets=["block_tune_steps=0", f"prune_method={method}"])
        rep = prune_model(loaded.model, r, calib, progress=False)
        errs[method] = rep["mean_rel_err"]
        assert not torch.equal(layer.weight, w0)
    assert errs["sparsegpt"] < errs["wanda"] <= errs["magnitude"] * 1.05


def test_block_tuning_after_pruning_keeps_masks_and_helps_held_out_text():
    """2:4 alone with block_tune_steps: the kept float weights of each block are trained against the
    dense block (quant/blocktune.py); pruned weights stay exactly 0 and the logits move closer to the
    dense model's on text that was not used for calibration."""
    from algo.data import calibration_batches
    held = calibration_batches(load_model("tiny").tokenizer, 4, 128, seed=123)
    with torch.no_grad():
        ref = load_model("tiny").model(input_ids=held).logits
    errs, reps = {}, {}
    for steps in (0, 200):
        loaded = load_model("tiny")
        r = load_recipe("sparse24", sets=["calib_samples=16", "calib_seqlen=128", f"block_tune_steps={steps}",
                                          "block_tune_lr=0.03"])
        reps[steps] = prune_model(loaded.model, r, calibration_batches(loaded.tokenizer, 16, 128), progress=False,
                                  tune_block=tune_block)
        assert _check_masks(loaded.model, 2, 4) == 14
        with torch.no_grad():
            errs[steps] = float(((loaded.model(input_ids=held).logits - ref) ** 2).mean())
    assert "block_tune" not in reps[0]
    bt = reps[200]["block_tune"]
    assert len(bt) == 2 and all(b["mse_after"] < 0.6 * b["mse_before"] and not b["reverted"] for b in bt.values())
    assert errs[200] < 0.85 * errs[0], errs                   # measured 0.77 x
    with pytest.raises(AccllmError, match="block_tune_steps=8 needs calibration"):
        prune_model(load_model("tiny").model, load_recipe("sparse24", sets=["prune_method=magnitude",
                                                                          "block_tune_steps=8"]), None, progress=False)


def test_prune_other_nm_and_errors():
    loaded = load_model("tiny")
    rep = prune_model(loaded.model, load_recipe("sparse24", sets=["block_tune_steps=0", "sparsity=1:4", "prune_method=magnitude"]),
                      None, progress=False)
    assert _check_masks(loaded.model, 1, 4) == 14 and abs(rep["kept_fraction"] - 0.25) < 1e-9
    loaded = load_model("tiny")
    calib = torch.stack([_ids(32, s) for s in range(2)])
    prune_model(loaded.model, load_recipe("sparse24", sets=["block_tune_steps=0", "sparsity=4:8", "prune_method=sparsegpt"]), calib,
                progress=False)
    assert _check_masks(loaded.model, 4, 8) == 14
    with pytest.raises(AccllmError, match="needs calibration data"):
        prune_model(load_model("tiny").model, load_recipe("sparse24", sets=["block_tune_steps=0", "prune_method=wanda"]), None,
                    progress=False)
    with pytest.raises(AccllmError, match="tied to the embedding"):
        prune_model(load_model("tiny").model, load_recipe("sparse24", sets=["block_tune_steps=0", "prune_skip=", "prune_method=magnitude"]),
                    None, progress=False)


def test_invalid_settings_refused():
    for sets, msg in [(["sparsity=4:4"], "0 < N < M"), (["sparsity=5:4"], "0 < N < M"), (["window=0"], "window"),
                      (["token_keep=0"], r"\(0, 1\]"), (["head_keep=1.5"], r"\(0, 1\]"),
                      (["sparsity=2x4"], "N:M")]:
        with pytest.raises(AccllmError, match=msg):
            load_recipe("accllm", sets=sets)
    r = load_recipe("lambda")
    assert check_fits(r, 4096)["kv_slots"] == 1028
    with pytest.raises(AccllmError, match="S \\+ W = 4 \\+ 1024 = 1028 KV slots.*max_context 1000"):
        check_fits(r, 1000)
    assert check_fits(load_recipe("fp"), 2048)["bounded"] is False


# ------------------------------------------------------------------------------------ Λ attention
def _lambda_scorer(model, S, W, mode="cache", hook=None):
    r = load_recipe("lambda", sets=[f"sink_tokens={S}", f"window={W}", f"rope_mode={mode}"])
    return HFScorer(model, make_cache_factory(model, r, hook))


def _run(scorer, ids, block):
    s = scorer.new_session()
    return torch.cat([scorer.forward(s, ids[a:a + block]) for a in range(0, ids.numel(), block)]), s


def test_lambda_with_large_window_equals_full_attention():
    model = load_model("tiny").model
    ids = _ids(150)
    ref, _ = _run(HFScorer(model), ids, 150)
    out, _ = _run(_lambda_scorer(model, 4, 1024), ids, 61)
    assert (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize("S,W", [(4, 16), (0, 8), (3, 50)])
def test_lambda_original_matches_banded_mask_reference(S, W):
    model = load_model("tiny").model
    ids = _ids(160, 1)
    out, sess = _run(_lambda_scorer(model, S, W, "original"), ids, 37)
    i, j = torch.arange(160)[:, None], torch.arange(160)[None]
    vis = (j <= i) & ((j < S) | (j > i - W))
    mask = torch.zeros(1, 1, 160, 160).masked_fill(~vis, float("-inf"))
    with torch.no_grad():
        ref = model(input_ids=ids[None], attention_mask=mask, use_cache=False).logits[0]
    assert (out - ref).abs().max() < 1e-4
    assert sess["cache"].layers[0].stored() == S + W
    # A different rule (no sinks) must differ: the check is not vacuous.
    if S:
        vis2 = (j <= i) & (j > i - W)
        with torch.no_grad():
            ref2 = model(input_ids=ids[None], attention_mask=torch.zeros(1, 1, 160, 160).masked_fill(
                ~vis2, float("-inf")), use_cache=False).logits[0]
        assert (out - ref2).abs().max() > 1e-3


def test_lambda_cache_mode_blocks_equal_decode_and_differs_from_original():
    model = load_model("tiny").model
    ids = _ids(80, 2)
    a, _ = _run(_lambda_scorer(model, 4, 16, "cache"), ids, 40)
    b, _ = _run(_lambda_scorer(model, 4, 16, "cache"), ids, 1)
    c, _ = _run(_lambda_scorer(model, 4, 16, "original"), ids, 40)
    assert (a - b).abs().max() < 1e-4
    assert (a[:20] - c[:20]).abs().max() < 1e-4        # while i <= S+W-1 both modes agree
    assert (a[40:] - c[40:]).abs().max() > 1e-4        # later the sink distances differ


def test_lambda_rope_cache_mode_equals_rerotated_cache():
    """Cache mode == StreamingLLM: re-rotate every kept key at its cache position (single layer check)."""
    from algo.attention import _rope
    model = load_model("tiny").model
    rot = model.model.rotary_emb
    S, W, d = 2, 5, 32
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, d, generator=g), torch.randn(1, 1, 20, d, generator=g)
    i = 19
    keep = [0, 1] + list(range(i - W + 1, i + 1))
    # accllm: keys rotated at absolute positions; query rotated at i (window) and min(i, S+W-1) (sinks)
    cos, sin = rot(k, torch.arange(20)[None])
    k_abs = _rope(k, cos, sin)
    cq, sq = rot(q, torch.tensor([[i]]))
    cc, sc = rot(q, torch.tensor([[S + W - 1]]))
    s_win = (_rope(q, cq, sq) @ k_abs[:, :, keep[S:]].transpose(2, 3)).flatten()
    s_sink = (_rope(q, cc, sc) @ k_abs[:, :, :S].transpose(2, 3)).flatten()
    ours = torch.cat([s_sink, s_win])
    # reference: keys re-rotated at cache positions 0..S+W-1, query at S+W-1
    ck, sk = rot(k, torch.arange(S + W)[None])
    k_c = _rope(k[:, :, keep], ck, sk)
    ref = (_rope(q, cc, sc) @ k_c.transpose(2, 3)).flatten()
    assert torch.allclose(ours, ref, atol=1e-4)


def test_lambda_runs_far_beyond_trained_context_with_bounded_memory():
    loaded = load_model("tiny")
    model = loaded.model
    assert model.config.max_position_embeddings == 8192
    ids = _ids(9000, 3)
    r = load_recipe("lambda", sets=["window=32"])
    new, cache = generate(model, ids, 12, make_cache_factory(model, r), block=3000)
    assert new.shape == (12,) and cache.get_seq_length() == 9012 and cache.layers[0].stored() == 36
    assert cache.peak_tokens == 36 and int(cache.layers[1].pos[-1]) == 9011
    res = perplexity_stream(_lambda_scorer(model, 4, 32), ids[:400], 400, 100, progress=False)
    assert res["kv"]["kv_tokens_peak"] == 36 and res["kv"]["kv_slots"] == 36 and math.isfinite(res["ppl"])
    full = perplexity_stream(HFScorer(model), ids[:400], 400, 100, progress=False)
    assert full["kv"]["kv_tokens_peak"] == 400


def test_kv_hook_applied_to_what_is_stored():
    model = load_model("tiny").model
    calls = []

    def hook(layer_idx, k, v):
        calls.append((layer_idx, k.shape[2]))
        return k, torch.round(v * 4) / 4            # a crude fake-quantizer of the values

    ids = _ids(100, 4)
    out, s = _run(_lambda_scorer(model, 2, 30, hook=hook), ids, 50)
    plain, _ = _run(_lambda_scorer(model, 2, 30), ids, 50)
    assert sorted(set(c[0] for c in calls)) == [0, 1] and all(n == 50 for _, n in calls)
    v = s["cache"].layers[1].v
    assert torch.equal(v, torch.round(v * 4) / 4)
    assert (out - plain).abs().max() > 1e-4
    # full attention: the DynamicCache applies the hook on writes too
    r = load_recipe("fp")
    calls.clear()
    sc = HFScorer(model, make_cache_factory(model, r, hook))
    out_full, s = _run(sc, ids, 50)
    assert len(calls) == 4
    assert torch.equal(s["cache"].layers[0].values, torch.round(s["cache"].layers[0].values * 4) / 4)


# ------------------------------------------------------------------------------------ SpAtten
def _spatten_model(sets):
    from algo.spatten import install
    loaded = load_model("tiny")
    r = load_recipe("spatten", sets=sets)
    cf = make_cache_factory(loaded.model, r, None) if r.attention != "full" else None
    info = install(loaded.model, r)
    return loaded.model, HFScorer(loaded.model, cf), info


def test_spatten_keep_all_is_exact():
    model, sc, _ = _spatten_model(["token_keep=1.0", "head_keep=1.0", "spatten_start_layer=0"])
    ids = _ids(300, 5)
    a = perplexity_stream(sc, ids, 300, 50, progress=False)
    b = perplexity_stream(HFScorer(load_model("tiny").model), ids, 300, 50, progress=False)
    assert math.isclose(a["ppl"], b["ppl"], rel_tol=1e-5)
    assert a["kv"]["kv_reads_saved"] == 0.0


def test_spatten_cascade_and_reads_saved():
    model, sc, info = _spatten_model(["token_keep=0.5", "head_keep=0.5", "spatten_start_layer=0",
                                      "spatten_recent=32", "sink_tokens=2"])
    assert info["recent"] == 32
    ids = _ids(400, 6)
    s = sc.new_session()
    history = []
    for a in range(0, 400, 40):
        sc.forward(s, ids[a:a + 40])
        stt = s["cache"].accllm_spatten_state
        history.append(stt.pruned_at[: a + 40].clone())
    st_ = s["cache"].accllm_spatten_state
    n = 400
    pruned_at = st_.pruned_at[:n]
    # sinks and the recent tokens are never pruned; about half the older tokens are read by layer 1
    assert bool((pruned_at[:2] == 2).all()) and bool((pruned_at[n - 32:] == 2).all())
    older = pruned_at[2:n - 32]
    assert 0.3 < float((older == 2).float().mean()) < 0.7
    # cascade over steps: a token once pruned at layer l stays pruned at layer <= l
    for prev, nxt in zip(history, history[1:]):
        assert bool((nxt[: prev.numel()] <= prev).all())
    # heads: floor(0.5 * 4) = 2 kept from layer 0 on (cascade: layer 1 prunes a superset)
    stats = st_.stats()
    assert stats["heads_pruned_per_layer"] == [2, 2]
    assert 0.3 < stats["attention_reads_saved"] < 0.95 and 0 < stats["kv_reads_saved"] < 0.95


def test_spatten_composes_with_lambda_and_validates():
    model, sc, info = _spatten_model(["attention=lambda", "window=64", "spatten_recent=16", "spatten_start_layer=1",
                                      "head_keep=1.0"])
    res = perplexity_stream(sc, _ids(500, 7), 500, 25, progress=False)
    assert res["kv"]["kv_tokens_peak"] == 4 + 64
    assert 0 < res["kv"]["kv_reads_saved"] < 0.5
    from algo.spatten import install
    with pytest.raises(AccllmError, match="one ratio per layer"):
        install(load_model("tiny").model, load_recipe("spatten", sets=["token_keep=0.5,0.5,0.5", "spatten_start_layer=0"]))
    with pytest.raises(AccllmError, match="spatten_start_layer=5"):
        install(load_model("tiny").model, load_recipe("spatten", sets=["spatten_start_layer=5"]))


# ------------------------------------------------------------------------------------ CLI
def test_cli_lambda_stream_json_and_plot(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    png = tmp_path / "blocks.png"
    r = subprocess.run(ACCLLM + ["eval", "--model", "tiny", "--recipe", "lambda", "--set", "window=64",
                                 "--data", str(f), "--stream", "--length", "600", "--block", "128", "--json",
                                 "--no-progress", "--plot", str(png)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [b["end"] for b in out["blocks"]] == [128, 256, 384, 512, 600]
    assert out["kv"]["kv_tokens_peak"] == 68 and png.stat().st_size > 1000


def test_spatten_keep_curve_plot(tmp_path):
    from algo.spatten import plot_keep_curve
    res = [{"recipe": {"token_keep": k, "spatten_start_layer": 0}, "ppl": p, "kv": {"kv_reads_saved": s}}
           for k, p, s in [(0.5, 12.0, 0.3), (1.0, 10.0, 0.0), ([0.25, 0.25], 20.0, 0.5)]]
    rows = plot_keep_curve(res, str(tmp_path / "c.png"))
    assert rows == [(0.25, 20.0, 0.5), (0.5, 12.0, 0.3), (1.0, 10.0, 0.0)]
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_keep_counts_match_the_ratio_for_usual_ratios():
    """The accelerator's fixed-point keep count ((ceil(r * 2**16) * n) >> 16, shared by algo/spatten.py and
    the TOPK instruction) equals floor(r * n) for tenths, quarters and thirds at every n up to 4096."""
    from algo.topk import keep_count, keep_q16
    for r in [0.1, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.7, 0.75, 0.8, 0.9, 1.0]:
        q = keep_q16(r)
        assert all(keep_count(q, n) == math.floor(r * n + 1e-9) for n in range(4097)), r
    assert keep_count(keep_q16(0.1), 3, at_least=1) == 1
    with pytest.raises(AccllmError, match=r"\(0, 1\]"):
        keep_q16(0.0)
