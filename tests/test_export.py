"""`accllm export`: GGUF (llama.cpp) and compressed-tensors (transformers) exports of two tiny packages,
read back with gguf.GGUFReader and loaded with transformers, against the package's fake-quant model
bit for bit; refusals (not a package, unknown format, an OUT accllm did not write) and atomic writes.

Packages (cached by the digest of the sources that produce them, like tests/test_host_runtime.py):
  A: the accllm recipe's structure (2:4, W2 g64, A8, KV4, Λ; lm_head W8) with RTN and magnitude
     pruning on a tiny calibration set -- its W8 lm_head is not Q8_0-exact (falls back to F32);
  B: W4 g32, layer 1's o_proj kept in float, lm_head tied to the embedding, no activation quantization.
"""
import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from algo.common import AccllmError

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "weight_method=rtn", "--set", "act_order=false", "--set", "block_tune_steps=0",
        "--set", "calib_samples=1", "--set", "calib_seqlen=16"]
RECIPES = {
    "a": ["--recipe", "accllm", "--set", "prune_method=magnitude", *FAST],
    "b": ["--recipe", "w4", "--set", "group_size=32", "--set", "high_precision_bits=0",
          "--set", "high_precision_layers=lm_head,model.layers.1.self_attn.o_proj", *FAST],
}


def _sources_digest(key):
    h = hashlib.sha256(json.dumps(RECIPES[key]).encode())
    for d in ("algo", "quant", "hw"):
        for p in sorted((REPO / d).rglob("*.py")):
            if p.name != "export.py":
                h.update(p.relative_to(REPO).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _package(key):
    from algo.common import cache_dir
    from host import cli
    from quant.package import load_package
    out = cache_dir("test-packages") / f"tiny-export-{key}-{_sources_digest(key)}"
    if out.is_dir():
        try:
            load_package(out)
            return out
        except AccllmError:
            shutil.rmtree(out)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.compile_model_main(["--model", "tiny", *RECIPES[key], "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def pkg_a():
    return _package("a")


@pytest.fixture(scope="module")
def pkg_b():
    return _package("b")


def _cli(argv):
    """accllm ARGV in-process: (rc, stdout, stderr)."""
    from host import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _fake_quant(pkg_dir):
    """The package's fake-quant torch model, activation quantization off (what a weights-only runtime
    computes), and its linear weights by name."""
    from quant.package import load_package
    pkg = load_package(pkg_dir)
    model = pkg.to_torch_model()
    for m in model.modules():
        if hasattr(m, "act_enabled"):
            m.act_enabled = False
    return pkg, model, {n: model.get_submodule(n).weight.detach() for n in pkg.manifest["layers"]}


def _no_vocab(monkeypatch):
    """GGUF exports without the 49,152-token vocabulary: gguf.GGUFReader (and transformers' GGUF loader,
    which reads a file twice) parse every token in Python, seconds each; the vocabulary itself is checked
    in test_gguf_export_reads_back_exact."""
    from quant import export

    def stub(pkg, mc, writer, d):
        writer.add_tokenizer_model("none")
        return {"model": "none"}
    monkeypatch.setattr(export, "_gguf_tokenizer", stub)


@pytest.fixture()
def no_vocab(monkeypatch):
    _no_vocab(monkeypatch)


IDS = torch.tensor([[1, 504, 3060, 28, 253, 1345, 314, 2]])


# --- GGUF ------------------------------------------------------------------------------------------

def test_gguf_export_reads_back_exact(pkg_a, tmp_path, monkeypatch):
    """GGUFReader: the llama metadata, llama.cpp tensor names, the tokenizer; every weight dequantized
    by gguf.quants equals the fake-quant model's (Q8_0 blocks for W2, F32 for the W8 lm_head)."""
    import gguf
    from quant.export import rope_row_order
    out = tmp_path / "a.gguf"
    rc, stdout, _ = _cli(["export", "--format", "gguf", str(pkg_a), str(out), "--json"])
    assert rc == 0
    rep = json.loads(stdout)
    pkg, _model, weights = _fake_quant(pkg_a)
    mc = pkg.manifest["model_config"]
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith(
        ("model", "pre", "_id"))}
    assert f["general.architecture"] == "llama"
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
            f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.rope.dimension_count"], f["llama.vocab_size"]) == (
        mc["max_position_embeddings"], mc["hidden_size"], mc["num_hidden_layers"], mc["intermediate_size"],
        mc["num_attention_heads"], mc["num_key_value_heads"], mc["head_dim"], mc["vocab_size"])
    assert f["llama.rope.freq_base"] == pytest.approx(mc["rope_parameters"]["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(mc["rms_norm_eps"])
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    vocab = json.loads((pkg_a / "tokenizer.json").read_text())["model"]["vocab"]
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(toks) == mc["vocab_size"] and all(toks[i] == s for s, i in list(vocab.items())[::997])
    assert len(r.fields["tokenizer.ggml.merges"].data) > 40000
    assert f["accllm.package.manifest_sha256"] == pkg.manifest["manifest_sha256"]

    tensors = {t.name: t for t in r.tensors}
    names = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v",
                                                           "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names
    listed = {t["tensor"]: t for t in rep["tensors"]}
    suffix = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
    for hf, w in weights.items():
        gname = "output.weight" if hf == "lm_head" else \
            f"blk.{hf.split('.')[2]}.{suffix[hf.split('.', 3)[3]]}.weight"
        t = tensors[gname]
        back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape).copy())
        if hf.endswith(("q_proj", "k_proj")):            # llama.cpp's RoPE row order, undone
            heads = mc["num_attention_heads"] if hf.endswith("q_proj") else mc["num_key_value_heads"]
            back = back[np.argsort(rope_row_order(w.shape[0], heads))]
        assert torch.equal(back, w), gname
        assert listed[gname]["exact"] and listed[gname]["type"] == t.tensor_type.name
        want = "F32" if hf == "lm_head" else "Q8_0"      # W8 lm_head: code - zero leaves int8
        assert t.tensor_type.name == want, (gname, listed[gname]["note"])
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "F16"
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(emb.data, emb.tensor_type)).reshape(
        mc["vocab_size"], -1), pkg.tensor("model.embed_tokens.weight").float())
    assert rep["exact"] is True
    assert "output.weight" in listed and "outside Q8_0's int8" in listed["output.weight"]["note"]
    nr = " ".join(rep["not_reproduced"])
    for word in ("8-bit activations", "4-bit KV cache", "Λ-shaped attention", "2:4"):
        assert word in nr
    # --inexact f16: the W8 lm_head rounded to fp16, listed as not exact; the Q8_0 tensors unchanged
    _no_vocab(monkeypatch)
    rc, stdout, _ = _cli(["export", "--format", "gguf", str(pkg_a), str(out), "--inexact", "f16", "--json"])
    assert rc == 0
    rep16 = {t["tensor"]: t for t in json.loads(stdout)["tensors"]}
    assert rep16["output.weight"]["type"] == "F16" and not rep16["output.weight"]["exact"]
    assert all(t["exact"] for n, t in rep16.items() if n != "output.weight")


def test_gguf_loads_in_transformers_with_the_packages_logits(pkg_b, tmp_path, no_vocab):
    """transformers' GGUF loader (a llama-architecture reader of its own: metadata keys, tensor names,
    the RoPE row order) loads the export of package B; its logits equal the fake-quant model's exactly.
    Float layer -> F16, tied lm_head -> no output tensor."""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "b.gguf"
    rc, stdout, _ = _cli(["export", "--format", "gguf", str(pkg_b), str(out), "--json"])
    assert rc == 0
    rep = {t["tensor"]: t for t in json.loads(stdout)["tensors"]}
    assert rep["blk.1.attn_output.weight"]["type"] == "F16" and rep["blk.0.attn_q.weight"]["type"] == "Q8_0"
    assert rep["output.weight"]["type"] is None and "tied" in rep["output.weight"]["note"]
    _pkg, model, weights = _fake_quant(pkg_b)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    for n, w in weights.items():
        assert torch.equal(hf.get_submodule(n).weight, w), n
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, model(IDS).logits)


def test_q8_0_exactness_rule():
    """Q8_0 holds scale*(code - zero) exactly iff the group is a multiple of 32 and code - zero fits int8."""
    import gguf
    from quant.export import q8_0_from_codes
    from quant.quantizers import dequant_weight
    g = torch.Generator().manual_seed(0)
    n, k = 4, 128
    scales = (torch.rand(n, k // 64, generator=g) * 0.01 + 1e-4).half()
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 1 << bits, (n, k), generator=g)
        zeros = torch.full((n, k // 64), (1 << bits) // 2, dtype=torch.long)     # code - zero in int8
        blocks, why = q8_0_from_codes(codes.numpy(), zeros.numpy(), scales, 64)
        assert blocks is not None, why
        back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(n, k)
        assert np.array_equal(back, dequant_weight(codes, zeros, scales, 64).numpy())
    codes = torch.full((n, k), 255)
    assert "outside" in q8_0_from_codes(codes.numpy(), np.zeros((n, 2), np.int64), scales, 64)[1]
    assert "multiple of 32" in q8_0_from_codes(codes.numpy() % 4, np.zeros((n, 8), np.int64),
                                               torch.ones(n, 8).half(), 16)[1]


# --- compressed-tensors ----------------------------------------------------------------------------

def test_compressed_tensors_loads_in_transformers_exact(pkg_a, pkg_b, tmp_path):
    """AutoModelForCausalLM.from_pretrained(OUT) with no options: every linear weight equals the
    fake-quant model's bit for bit and so do the logits; the packing is compressed-tensors' own."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from quant.export import pack_int32
    for key, pkg_dir in (("a", pkg_a), ("b", pkg_b)):
        out = tmp_path / f"{key}-ct"
        rc, stdout, _ = _cli(["export", "--format", "compressed-tensors", str(pkg_dir), str(out), "--json"])
        assert rc == 0
        rep = json.loads(stdout)
        assert rep["exact"] and {"tokenizer.json", "tokenizer_config.json"} <= set(rep["tokenizer_files"])
        cfg = json.loads((out / "config.json").read_text())
        qc = QuantizationConfig.model_validate({k: v for k, v in cfg["quantization_config"].items()
                                                if k != "dequantize"})
        assert qc.format == "pack-quantized" and len(qc.config_groups) == 1
        _pkg, model, weights = _fake_quant(pkg_dir)
        hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert hf.dtype == torch.float32
        for n, w in weights.items():
            assert torch.equal(hf.get_submodule(n).weight, w), (key, n)
        with torch.no_grad():
            assert torch.equal(hf(IDS).logits, model(IDS).logits), key
        layers = {x["layer"]: x for x in rep["layers"]}
        if key == "a":
            assert layers["model.layers.0.mlp.up_proj"]["format"] == "pack-quantized W2 g64 asymmetric"
            assert layers["lm_head"]["format"] == "dense float32"     # W8: not the packed scheme, stored exact
            st = load_file(str(out / "model.safetensors"))
            assert st["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32
        else:
            assert layers["model.layers.1.self_attn.o_proj"]["format"] == "dense float16"
            assert cfg["tie_word_embeddings"] is True
    g = torch.Generator().manual_seed(1)
    for bits in (2, 3, 4, 8):                    # pack_int32 is compressed-tensors' pack_to_int32
        v = torch.randint(0, 1 << bits, (5, 70), generator=g)
        ref = pack_to_int32((v - (1 << (bits - 1))).to(torch.int8), bits)
        assert torch.equal(torch.from_numpy(pack_int32(v.numpy().astype(np.uint8), bits)), ref), bits


# --- refusals and atomic writes --------------------------------------------------------------------

def test_bad_input_is_refused_with_one_line(pkg_a, tmp_path):
    stranger = tmp_path / "notes.gguf"
    stranger.write_text("mine")
    d = tmp_path / "somedir"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    cases = [
        (["--format", "gguf", str(tmp_path), str(tmp_path / "x.gguf")], "not an accllm package"),
        (["--format", "gguf", str(stranger), str(tmp_path / "x.gguf")], "not found"),
        (["--format", "onnx", str(pkg_a), str(tmp_path / "x.onnx")], "unknown export format 'onnx'"),
        (["--format", "gguf", str(pkg_a), str(stranger)], "not an earlier accllm gguf export"),
        (["--format", "compressed-tensors", str(pkg_a), str(d)], "not an earlier accllm compressed-tensors export"),
        (["--format", "compressed-tensors", str(pkg_a), str(pkg_a)], "not an earlier accllm"),
        (["--format", "gguf", str(pkg_a), str(tmp_path / "no" / "x.gguf")], "does not exist"),
    ]
    for argv, words in cases:
        rc, out, err = _cli(["export", *argv])
        lines = err.strip().splitlines()
        assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], \
            (argv, err)
    assert stranger.read_text() == "mine" and (d / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "somedir"]


def test_writes_are_atomic(pkg_a, tmp_path, monkeypatch, no_vocab):
    """A failure while writing leaves neither a partial OUT nor temporary files, and an earlier export
    in its place untouched; a second export over an earlier one replaces it."""
    import gguf
    import safetensors.numpy
    from quant import export
    g = tmp_path / "a.gguf"
    ct = tmp_path / "a-ct"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
        m.setattr(safetensors.numpy, "save_file", boom)
        for fn, out in ((export.export_gguf, g), (export.export_compressed_tensors, ct)):
            with pytest.raises(RuntimeError):
                fn(pkg_a, out)
    assert list(tmp_path.iterdir()) == []
    export.export_gguf(pkg_a, g)
    export.export_compressed_tensors(pkg_a, ct)
    before = (g.read_bytes(), (ct / "model.safetensors").read_bytes())
    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
        m.setattr(safetensors.numpy, "save_file", boom)
        for fn, out in ((export.export_gguf, g), (export.export_compressed_tensors, ct)):
            with pytest.raises(RuntimeError):
                fn(pkg_a, out)
    assert (g.read_bytes(), (ct / "model.safetensors").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-ct", "a.gguf"]
    export.export_gguf(pkg_a, g)                        # ours: replaced
    export.export_compressed_tensors(pkg_a, ct)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-ct", "a.gguf"]


def test_help_says_what_is_not_reproduced():
    from host import cmd_export
    text = cmd_export.DESCRIPTION
    for words in ("NOT reproduce", "8-bit activations", "4-bit KV cache", "Λ-shaped attention", "SpAtten",
                  "2:4 sparsity is stored densely", "Q8_0", "bit-exact"):
        assert words in text
