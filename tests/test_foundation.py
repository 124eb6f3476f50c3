"""Loader, data, recipe validation, perplexity harness and CLI error handling."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algo.common import AccllmError, atomic_directory
from algo.data import data_path, load_tokens
from algo.eval import HFScorer, perplexity_chunks, perplexity_stream
from algo.models import load_model
from algo.recipe import PRESETS, load_recipe

ROOT = Path(__file__).resolve().parents[1]
ACCLLM = [sys.executable, "-m", "host.cli"]


def test_tiny_is_deterministic_llama_with_gqa(tiny):
    cfg = tiny.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert tiny.model.lm_head.weight.data_ptr() == tiny.model.model.embed_tokens.weight.data_ptr()
    again = load_model("tiny")
    for (n, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert again.source_sha256 == tiny.source_sha256


def test_tokenizer_round_trip(tiny):
    ids = tiny.tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert tiny.tokenizer.decode(ids) == "Hello world"


def test_hf_directory_round_trip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)
    tiny.tokenizer.save_pretrained(tmp_path)
    m = load_model(str(tmp_path))
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.allclose(m.model(ids).logits, tiny.model(ids).logits)


def test_refuses_non_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(AccllmError, match="unsupported architecture GPT2LMHeadModel"):
        load_model(str(tmp_path))


def test_refuses_pickle_only_dir(tmp_path, tiny):
    tiny.model.config.to_json_file(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AccllmError, match="safetensors"):
        load_model(str(tmp_path))


def test_refuses_bad_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(AccllmError, match="not a readable GGUF"):
        load_model(str(bad))


def test_missing_model():
    with pytest.raises(AccllmError, match="not found"):
        load_model("/nonexistent")


def test_data_paths(monkeypatch, tmp_path):
    assert data_path("wikitext2").name == "test.txt"
    assert data_path("wikitext2-valid").name == "valid.txt"
    monkeypatch.setenv("ACCLLM_DATA", str(tmp_path))
    with pytest.raises(AccllmError, match="ACCLLM_DATA"):
        data_path("wikitext2")
    with pytest.raises(AccllmError, match="neither a dataset name"):
        data_path(str(tmp_path / "nope.txt"))


def test_recipes_validate():
    for name in PRESETS:
        load_recipe(name)
    r = load_recipe("w2a8kv4", sets=["weight_bits=4", "group_size=128"])
    assert (r.weight_bits, r.group_size, r.act_bits, r.kv_bits) == (4, 128, 8, 4)
    with pytest.raises(AccllmError, match="weight_bits=5"):
        load_recipe("w2a8kv4", sets=["weight_bits=5"])
    with pytest.raises(AccllmError, match="unknown recipe key 'bogus'"):
        load_recipe("fp", sets=["bogus=1"])
    with pytest.raises(AccllmError, match="unknown recipe"):
        load_recipe("nope")
    with pytest.raises(AccllmError, match="N:M needs"):
        load_recipe("fp", sets=["sparsity=4:4"])
    with pytest.raises(AccllmError, match=r"\(0, 1\]"):
        load_recipe("fp", sets=["token_keep=1.5"])


def test_recipe_file(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('weight_bits = 3\ngroup_size = 32\n')
    r = load_recipe("w2", recipe_file=str(f), sets=["group_size=128"])
    assert (r.weight_bits, r.group_size) == (3, 128)
    f.write_text('colour = "red"\n')
    with pytest.raises(AccllmError, match="unknown recipe key 'colour'"):
        load_recipe("w2", recipe_file=str(f))


def test_chunk_ppl_matches_direct_computation(tiny):
    toks = torch.randint(0, tiny.config.vocab_size, (3 * 64,), generator=torch.Generator().manual_seed(0))
    res = perplexity_chunks(HFScorer(tiny.model), toks, ctx=64, chunks=3, progress=False)
    nll = []
    with torch.no_grad():
        for c in range(3):
            ids = toks[c * 64:(c + 1) * 64]
            logits = tiny.model(ids[None]).logits[0]
            nll.append(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item())
    assert res["tokens_scored"] == 3 * 63
    assert math.isclose(res["ppl"], math.exp(sum(nll) / (3 * 63)), rel_tol=1e-5)


def test_stream_equals_one_long_chunk_with_full_cache(tiny):
    toks = torch.randint(0, tiny.config.vocab_size, (200,), generator=torch.Generator().manual_seed(1))
    s = perplexity_stream(HFScorer(tiny.model), toks, length=200, block=64, progress=False)
    c = perplexity_chunks(HFScorer(tiny.model), toks, ctx=200, chunks=1, progress=False)
    assert s["tokens_scored"] == 199
    assert [b["end"] for b in s["blocks"]] == [64, 128, 192, 200]
    assert math.isclose(s["ppl"], c["ppl"], rel_tol=1e-4)


def test_atomic_directory_keeps_old_on_failure(tmp_path):
    final = tmp_path / "pkg"
    with atomic_directory(final) as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as d:
            (d / "a").write_text("2")
            raise RuntimeError("interrupted")
    assert (final / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def _cli(*args, env=None):
    return subprocess.run(ACCLLM + list(args), capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_cli_help_lists_commands():
    r = _cli("--help")
    assert r.returncode == 0
    for cmd in ("eval", "demo", "compile"):
        assert cmd in r.stdout


def test_cli_eval_clean_errors(tmp_path):
    r = _cli("eval", "--model", "/nonexistent", "--chunks", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GemmaForCausalLM"]}))
    r = _cli("eval", "--model", str(tmp_path), "--chunks", "1")
    assert r.returncode == 2 and "GemmaForCausalLM" in r.stderr and "Traceback" not in r.stderr
    r = _cli("eval", "--model", "tiny", "--data", str(tmp_path / "missing.txt"), "--chunks", "1")
    assert r.returncode == 2 and "missing.txt" in r.stderr and "Traceback" not in r.stderr


def test_cli_eval_json_on_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    r = _cli("eval", "--model", "tiny", "--data", str(f), "--ctx", "128", "--chunks", "2", "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ppl"] > 1 and out["chunks"] == 2
