"""compile-model's named build steps: stop and resume give the bytes of a one-shot build, the package
records its configuration and steps, and every wrong use is refused before any work."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from algo.common import AccllmError
from host.build import STEP_NAMES, BuildConfig
from host.cli import compile_model_main

ROOT = Path(__file__).resolve().parents[1]
# the accllm recipe (2:4 + W2 + A8 + KV4 + Λ) made quick; every step but smooth runs
BASE = ["--model", "tiny", "--recipe", "accllm", "--hw", "sim-small", "--no-progress", "--json",
        "--set", "calib_samples=2", "--set", "calib_seqlen=64", "--set", "block_tune_steps=4"]
COMPARED = ["weights.safetensors", "program.bin", "hbm_w0.bin", "hbm_w1.bin", "memmap.json"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _build(out, *extra):
    assert compile_model_main(BASE + ["--out", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory):
    out = tmp_path_factory.mktemp("oneshot") / "pkg"
    _build(out)
    return out


def test_one_shot_package_records_config_and_steps(one_shot):
    steps = json.loads((one_shot / "steps.json").read_text())
    assert [s["name"] for s in steps] == ["load", "prune", "kv-calibrate", "attention", "quantize", "pack",
                                          "program", "finalize"]
    assert all(set(s) == {"name", "seconds", "peak_rss_mb"} and s["peak_rss_mb"] > 0 for s in steps)
    cfg = BuildConfig.from_dict(json.loads((one_shot / "build_config.json").read_text()), "build_config.json")
    assert cfg.model == "tiny" and cfg.hw == "sim-small" and cfg.recipe["sparsity"] == "2:4"
    assert cfg.recipe["block_tune_steps"] == 4
    man = json.loads((one_shot / "manifest.json").read_text())
    assert {"build_config.json", "steps.json", "program.bin"} <= set(man["files"])
    assert man["quant_report"]["prune"]["layers_pruned"] == 14 and "block_tune" in man["quant_report"]["quantize"]
    assert not (one_shot / "steps").exists()           # artefacts only when asked for


def test_package_carries_its_tokenizer(one_shot):
    from algo.models import smollm2_tokenizer
    from host.runtime import tokenizer_for
    man = json.loads((one_shot / "manifest.json").read_text())
    assert "tokenizer.json" in man["files"]
    tok = tokenizer_for(one_shot, {"source": {"spec": "/nowhere/model"}})   # the source model is not needed
    text = "The capital of France is Paris."
    assert tok(text)["input_ids"] == smollm2_tokenizer()(text)["input_ids"]


def test_stop_then_start_in_another_process_is_byte_identical(one_shot, tmp_path):
    d = tmp_path / "D"
    _build(d, "--stop-step", "quantize")
    assert not (d / "manifest.json").exists()
    assert sorted(p.name for p in (d / "steps").iterdir()) == ["attention", "build_config.json", "kv-calibrate",
                                                              "load", "prune", "quantize"]
    r = subprocess.run([sys.executable, "-m", "host.cli", "compile", *BASE, "--out", str(d), "--start-step", "pack"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    for f in COMPARED:
        assert _sha(d / f) == _sha(one_shot / f), f
    steps = json.loads((d / "steps.json").read_text())
    assert [s["name"] for s in steps if s.get("resumed")] == ["load", "prune", "kv-calibrate", "attention", "quantize"]
    assert [s["name"] for s in steps if not s.get("resumed")] == ["pack", "program", "finalize"]
    from quant.package import load_package
    load_package(d)                                      # the package with its steps/ folder verifies


def test_every_resume_point_gives_the_same_bytes(one_shot, tmp_path):
    """load → prune (the model is loaded again), attention → quantize (attention is replayed on the
    restored kv-calibrate model), program → finalize (the packed and program files are reused)."""
    d = tmp_path / "D"
    _build(d, "--stop-step", "load")
    _build(d, "--start-step", "prune", "--stop-step", "attention")
    _build(d, "--start-step", "quantize", "--stop-step", "program")
    assert sorted(p.name for p in (d / "steps").iterdir() if p.is_dir()) == [
        "attention", "kv-calibrate", "load", "pack", "program", "prune", "quantize"]
    _build(d, "--start-step", "finalize")
    for f in COMPARED:
        assert _sha(d / f) == _sha(one_shot / f), f


@pytest.mark.parametrize("extra, words", [
    (["--stop-step", "compress"], ["--stop-step 'compress'", "steps: load, smooth, prune"]),
    (["--start-step", "packing"], ["--start-step 'packing'", "finalize"]),
    (["--start-step", "pack", "--stop-step", "prune"], ["comes after", "steps in order"]),
])
def test_wrong_step_names_are_refused_with_the_list(tmp_path, capsys, extra, words):
    assert compile_model_main(BASE + ["--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "x").exists()


def test_resume_needs_saved_steps_of_the_same_build(tmp_path, capsys):
    d = tmp_path / "D"
    assert compile_model_main(BASE + ["--out", str(d), "--start-step", "pack"]) == 2
    assert "holds no saved build steps" in capsys.readouterr().err
    _build(d, "--stop-step", "load")
    assert compile_model_main(BASE + ["--out", str(d), "--start-step", "pack"]) == 2
    assert "step prune has no saved artefact" in capsys.readouterr().err
    assert compile_model_main(BASE + ["--out", str(d), "--start-step", "prune", "--set", "seed=7"]) == 2
    err = capsys.readouterr().err
    assert "another build configuration" in err and "recipe key seed: 0 there, 7 now" in err
    assert (d / "steps" / "load" / "step.json").is_file()      # nothing saved was lost


def test_out_holding_other_files_is_refused_before_loading(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    assert compile_model_main(BASE + ["--out", str(d)]) == 2
    assert "holds files accllm did not write (notes.txt)" in capsys.readouterr().err
    assert (d / "notes.txt").read_text() == "keep me"
    f = tmp_path / "file"
    f.write_text("x")
    assert compile_model_main(BASE + ["--out", str(f / "pkg")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert compile_model_main(BASE + ["--out", "/proc/accllm-pkg"]) == 2
    assert "system file system" in capsys.readouterr().err


def test_a_package_is_replaced_in_place_but_not_files_added_to_it(one_shot, tmp_path, capsys):
    import shutil
    d = tmp_path / "pkg"
    shutil.copytree(one_shot, d)
    (d / "notes.txt").write_text("keep me")
    fp = ["--model", "tiny", "--recipe", "fp", "--no-progress", "--json", "--out", str(d)]
    assert compile_model_main(fp) == 2
    assert "holds files accllm did not write (notes.txt)" in capsys.readouterr().err
    (d / "notes.txt").unlink()
    assert compile_model_main(fp) == 0
    assert json.loads((d / "build_config.json").read_text())["recipe"]["name"] == "fp"
    assert not (d / "program.bin").exists()


def test_help_lists_the_steps():
    r = subprocess.run([sys.executable, "-m", "host.cli", "compile", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0
    for name in STEP_NAMES:
        assert f"\n  {name} " in r.stdout, name
    assert "--stop-step" in r.stdout and "--start-step" in r.stdout


def test_build_config_from_a_file_is_type_checked():
    good = BuildConfig(model="tiny", recipe={"a": 1}, hw=None).to_dict()
    assert BuildConfig.from_dict(good, "x") == BuildConfig(model="tiny", recipe={"a": 1}, hw=None)
    with pytest.raises(AccllmError, match="hw_sets has the wrong type"):
        BuildConfig.from_dict({**good, "hw_sets": "a=1"}, "x")
    with pytest.raises(AccllmError, match="not a build configuration"):
        BuildConfig.from_dict({**good, "extra": 1}, "x")
