"""The package: compile-model on tiny, exact agreement with the fake-quant model, refusal of
tampered/truncated packages and bad recipes, the CLI spellings of the acceptance."""
import json
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from algo.common import AccllmError
from quant.package import FORMAT_VERSION, load_package

ROOT = Path(__file__).resolve().parents[1]
FAST = ["calib_samples=2", "calib_seqlen=64", "block_tune_steps=8"]


def _compile(out, recipe="w2a8kv4", sets=(), model="tiny"):
    from host.build import compile_model
    args = Namespace(model=model, recipe=recipe, recipe_file=None, sets=list(FAST) + list(sets), out=str(out),
                     json=True, no_progress=True)
    assert compile_model(args) == 0


@pytest.fixture(scope="module")
def pkg_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "tiny-w2a8kv4"
    _compile(out)
    return out


def test_manifest_contents(pkg_dir):
    man = json.loads((pkg_dir / "manifest.json").read_text())
    assert man["format"] == "accllm-package" and man["format_version"] == FORMAT_VERSION
    assert man["source"]["spec"] == "tiny" and len(man["source"]["sha256"]) == 64
    assert man["recipe"]["weight_bits"] == 2 and man["recipe"]["kv_bits"] == 4
    steps = json.loads((pkg_dir / "steps.json").read_text())
    assert [s["name"] for s in steps] == ["load", "kv-calibrate", "attention", "quantize", "pack", "finalize"]
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in steps)
    cfg = json.loads((pkg_dir / "build_config.json").read_text())
    assert cfg["model"] == "tiny" and cfg["recipe"]["weight_bits"] == 2 and cfg["hw"] is None
    q = man["tensors"]["model.layers.0.self_attn.q_proj.qweight"]
    assert q["dtype"] == "uint8" and q["bits"] == 2 and q["logical_shape"] == [128, 128] and q["shape"] == [128 * 128 // 4]
    assert man["tensors"]["model.embed_tokens.weight"]["dtype"] == "float16"
    assert "model.layers.1.self_attn.k_scale" in man["tensors"]
    fp = man["footprint"]
    # 2-bit codes + 2-bit zero + fp16 scale per 64 weights = 2 + 18/64 bits
    assert fp["bits_per_weight_blocks"] == pytest.approx(2 + 18 / 64, abs=1e-3)
    assert set(man["files"]) == {"weights.safetensors", "build_config.json", "steps.json", "tokenizer.json",
                                 "tokenizer_config.json", "chat_template.jinja"}


def test_package_reproduces_the_fake_quant_model(pkg_dir, fresh_tiny):
    from algo.recipe import load_recipe
    from quant.pipeline import prepare
    pkg = load_package(pkg_dir)
    prepared = prepare(fresh_tiny, load_recipe("w2a8kv4", sets=FAST), progress=False)
    ids = torch.arange(200, 260)
    a = prepared.scorer()
    ref = a.forward(a.new_session(), ids)
    model = pkg.to_torch_model()
    from algo.eval import HFScorer
    b = HFScorer(model, cache_factory=pkg.cache_factory(model))
    out = b.forward(b.new_session(), ids)
    assert torch.equal(ref, out)
    codes, zeros, scales, mask, bits, g = pkg.linear("model.layers.1.mlp.down_proj")
    qm = prepared.loaded.model.model.layers[1].mlp.down_proj
    assert bits == 2 and g == 64 and mask is None
    assert torch.equal(codes, qm.codes.long()) and torch.equal(zeros, qm.zeros.long()) and torch.equal(scales, qm.scales)


def test_24_sparse_layers_pack_indices(tmp_path, fresh_tiny):
    from algo.recipe import load_recipe
    from quant.package import package_tensors
    from quant.quantize import quantize_model
    lin = fresh_tiny.model.model.layers[0].mlp.up_proj
    w = lin.weight.detach()
    keep = w.abs().reshape(w.shape[0], -1, 4).argsort(-1, descending=True)[..., :2]
    mask = torch.zeros_like(w, dtype=torch.bool).reshape(w.shape[0], -1, 4).scatter_(-1, keep, True).reshape(w.shape)
    lin.accllm_mask = mask
    quantize_model(fresh_tiny.model, load_recipe("w4", sets=["weight_method=rtn"]), None, progress=False)
    tensors, meta, layers, fp = package_tensors(fresh_tiny.model)
    name = "model.layers.0.mlp.up_proj"
    assert layers[name]["sparsity"] == "2:4"
    assert meta[f"{name}.sparse_idx"]["logical_shape"] == [256, 32] and meta[f"{name}.qweight"]["logical_shape"] == [256, 64]
    # 4-bit kept codes over half the columns + 3 bits per 4 + zeros/scales per 64
    assert layers[name]["bits_per_weight"] == pytest.approx(2 + 0.75 + 20 / 64, abs=1e-3)
    q = fresh_tiny.model.model.layers[0].mlp.up_proj
    assert (q.weight[~mask] == 0).all()


def test_tampered_truncated_and_wrong_version_refused(pkg_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pkg_dir, bad)
    w = bad / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(AccllmError, match="weights.safetensors fails its sha256"):
        load_package(bad)
    w.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(AccllmError, match="weights.safetensors"):
        load_package(bad)
    w.unlink()
    with pytest.raises(AccllmError, match="weights.safetensors .*missing"):
        load_package(bad)
    shutil.rmtree(bad)
    shutil.copytree(pkg_dir, bad)
    man = json.loads((bad / "manifest.json").read_text())
    man["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(AccllmError, match="format_version 99"):
        load_package(bad)


def test_add_files_for_later_stages(pkg_dir, tmp_path):
    from quant.package import add_files
    d = tmp_path / "p"
    shutil.copytree(pkg_dir, d)
    add_files(d, {"program.bin": b"\x01\x02"}, {"hw": {"preset": "sim-small"}})
    pkg = load_package(d)
    assert "program.bin" in pkg.manifest["files"] and pkg.manifest["hw"]["preset"] == "sim-small"
    (d / "program.bin").write_bytes(b"\x01\x03")
    with pytest.raises(AccllmError, match="program.bin"):
        load_package(d)


def test_cli_acceptance_spellings(pkg_dir, tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    import os
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", "from host.cli import compile_model_main; import sys; "
                          "sys.exit(compile_model_main())", "--model", "tiny", "--recipe", "w2a8kv4",
                          "--set", "weight_bits=5", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 2 and "weight_bits=5" in out.stderr and not (tmp_path / "x").exists()
    bad = tmp_path / "bad"
    shutil.copytree(pkg_dir, bad)
    with open(bad / "weights.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x00\x00\x01")
    out = subprocess.run([sys.executable, "-m", "host.cli", "eval", "--package", str(bad), "--chunks", "1",
                          "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 2 and "weights.safetensors" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "host.cli", "eval", "--package", str(pkg_dir), "--chunks", "1",
                          "--ctx", "128", "--json", "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["recipe"]["weight_bits"] == 2 and np.isfinite(res["ppl"])
