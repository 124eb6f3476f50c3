"""Block-streamed compile-model (--stream-blocks, quant/stream.py): the same package as the whole-model
build, resumable after any block, the recipes it cannot stream refused; `accllm perf --package`; the
functional model's bounded weight cache; `accllm bench compile-7b` on a scaled-down shape (slow)."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from host.cli import compile_model_main, main

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--model", "tiny", "--recipe", "accllm", "--hw", "sim-small", "--no-progress", "--json",
        "--set", "calib_samples=2", "--set", "calib_seqlen=64", "--set", "block_tune_steps=4"]
COMPARED = ["weights.safetensors", "program.bin", "hbm_w0.bin", "hbm_w1.bin", "memmap.json"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "pkg"
    assert compile_model_main(BASE + ["--out", str(out), "--stream-blocks", "off"]) == 0
    return out


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    out = tmp_path_factory.mktemp("streamed") / "pkg"
    assert compile_model_main(BASE + ["--out", str(out), "--stream-blocks", "on"]) == 0
    return out


def test_streamed_package_has_the_bytes_of_the_whole_model_build(whole, streamed):
    for f in COMPARED:
        assert _sha(streamed / f) == _sha(whole / f), f
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (whole, streamed))
    assert a["tensors"] == b["tensors"] and a["layers"] == b["layers"] and a["footprint"] == b["footprint"]
    assert list(a["quant_report"]) == list(b["quant_report"])
    assert a["quant_report"]["prune"]["layers"].keys() == b["quant_report"]["prune"]["layers"].keys()
    steps = [s["name"] for s in json.loads((streamed / "steps.json").read_text())]
    assert steps == ["load", "blocks", "pack", "program", "finalize"]


def test_a_build_killed_after_a_block_continues_there_with_the_same_bytes(whole, tmp_path, monkeypatch):
    import algo.models as models
    real_load = models.load_block
    loaded = []

    def failing_load(model, li):
        if li == 1 and not loaded.count("resumed"):
            raise KeyboardInterrupt("killed after block 0")
        loaded.append(li)
        real_load(model, li)
    monkeypatch.setattr(models, "load_block", failing_load)
    d = tmp_path / "D"
    # as Ctrl-C (or SIGTERM) between blocks 0 and 1: the temporary package is removed, the saved steps stay
    assert compile_model_main(BASE + ["--out", str(d), "--stream-blocks", "on", "--save-steps"]) == 130
    assert not (d / "manifest.json").exists()
    progress = d / "steps" / ".blocks.progress"
    assert sorted(p.name for p in progress.iterdir()) == ["block_0000.safetensors", "state.pt"]
    loaded[:] = ["resumed"]
    assert compile_model_main(BASE + ["--out", str(d), "--stream-blocks", "on", "--start-step", "blocks"]) == 0
    assert loaded == ["resumed", 1]                  # block 0 came from its saved artefact
    for f in COMPARED:
        assert _sha(d / f) == _sha(whole / f), f
    assert not (d / "steps" / ".blocks.progress").exists() and (d / "steps" / "blocks" / "packed.json").is_file()
    steps = json.loads((d / "steps.json").read_text())
    assert [s["name"] for s in steps if s.get("resumed")] == ["load"]
    # and from the finished blocks step: pack, program, finalize again
    assert compile_model_main(BASE + ["--out", str(d), "--stream-blocks", "on", "--start-step", "pack"]) == 0
    for f in COMPARED:
        assert _sha(d / f) == _sha(whole / f), f


def test_recipes_that_need_the_whole_model_are_refused_when_streamed(tmp_path, capsys):
    for key in ("smooth_alpha=0.5", "qat_steps=2"):
        assert compile_model_main(BASE + ["--out", str(tmp_path / "x"), "--stream-blocks", "on", "--set", key]) == 2
        err = capsys.readouterr().err
        assert key.split("=")[0] in err and "cannot be block-streamed" in err and "--stream-blocks off" in err
        assert not (tmp_path / "x" / "manifest.json").exists()


def test_auto_streams_only_models_too_big_for_a_whole_load(tmp_path):
    from algo.models import STREAM_THRESHOLD_BYTES, float32_bytes
    from algo.recipe import load_recipe
    from host.build import stream_blocks
    r = load_recipe("accllm")
    assert float32_bytes("llama2-7b") > STREAM_THRESHOLD_BYTES > float32_bytes("smollm2-135m")
    assert not stream_blocks("tiny", "auto", r) and stream_blocks("tiny", "on", r)
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                                               "intermediate_size": 11008, "num_hidden_layers": 32,
                                               "num_attention_heads": 32, "vocab_size": 32000}))
    assert stream_blocks(str(d), "auto", r)


def test_perf_reads_a_package_dimensions(streamed, capsys):
    assert main(["perf", "--package", str(streamed), "--json"]) == 0
    from_pkg = json.loads(capsys.readouterr().out)
    assert main(["perf", "--model", "tiny", "--hw", "sim-small", "--recipe", "accllm", "--json"]) == 0
    named = json.loads(capsys.readouterr().out)
    assert from_pkg["hw"] == "sim-small" and from_pkg["bytes_per_token"] == named["bytes_per_token"]
    assert main(["perf", "--package", str(streamed), "--set", "window=8"]) == 2
    assert "--package brings its own recipe" in capsys.readouterr().err


def test_emu_with_a_weight_cache_smaller_than_one_layer_gives_the_same_tokens(streamed):
    from host.runtime import open_runtime
    runs = []
    for budget in (None, 0):
        rt = open_runtime(streamed, "emu", owner="test")
        try:
            if budget is not None:
                rt.device.weight_cache_bytes = budget
            tok = rt.feed([5, 6, 7, 8], want="argmax")
            toks = [tok]
            for _ in range(3):
                tok = rt.feed([tok], want="argmax")
                toks.append(tok)
            cached = sum(1 for k in rt.device._wcache if k[0] == "lin")
        finally:
            rt.close()
        runs.append((toks, cached))
    assert runs[0][0] == runs[1][0]
    assert runs[1][1] <= 1 < runs[0][1]


@pytest.mark.slow
def test_smollm2_streamed_from_its_shards_has_the_bytes_of_the_whole_model_build(tmp_path):
    base = ["--model", "smollm2-135m", "--recipe", "accllm", "--hw", "u280", "--no-progress", "--json",
            "--set", "calib_samples=8", "--set", "calib_seqlen=128", "--set", "block_tune_steps=4"]
    for mode in ("off", "on"):
        assert compile_model_main(base + ["--out", str(tmp_path / mode), "--stream-blocks", mode]) == 0
    for f in ["weights.safetensors", "program.bin", "hbm_w0.bin", "memmap.json"]:
        assert _sha(tmp_path / "on" / f) == _sha(tmp_path / "off" / f), f


@pytest.mark.slow
def test_bench_compile_7b_scaled_down(tmp_path):
    """The benchmark on a 2-layer, hidden-256 model of Llama-2-7B's layout (the 7B run itself: docs/scale.md)."""
    import os
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("ACCLLM_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "host.cli", "bench", "compile-7b", "--out", str(tmp_path / "pkg"),
                        "--layers", "2", "--hidden", "256", "--json"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["config"] == {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 2,
                             "num_key_value_heads": 2, "intermediate_size": 704, "vocab_size": 32000}
    assert [s["name"] for s in res["steps"]] == ["load", "blocks", "pack", "program", "finalize"]
    assert res["peak_rss_mb"] == max(s["peak_rss_mb"] for s in res["steps"]) > 0
    assert len(res["emu_tokens"]) == 3 and all(0 <= t < 32000 for t in res["emu_tokens"])
    assert res["perf"]["bytes_per_token"] > 0 and "RTN" in res["stand_ins"]
    assert Path(res["model_dir"]).parent == tmp_path / "cache" / "accllm" / "models"
    # the random model is reused
    r2 = subprocess.run([sys.executable, "-m", "host.cli", "bench", "compile-7b", "--out", str(tmp_path / "pkg"),
                         "--layers", "2", "--hidden", "256", "--json"], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=1200)
    assert r2.returncode == 0 and "writing a random fp16 model" not in r2.stderr
    assert _sha(tmp_path / "pkg" / "weights.safetensors") and json.loads(r2.stdout)["emu_tokens"] == res["emu_tokens"]
