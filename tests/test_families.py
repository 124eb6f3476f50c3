"""Model families beyond SmolLM2's Llama: a random-init tiny Llama-3.2-style model (llama3 RoPE scaling),
Qwen2-style (q/k/v biases) and Mistral-style (sliding_window) directory, each compiled with
``compile-model --recipe accllm --hw sim-small`` (small calibration) and run on the functional model:
``accllm run`` works and the emu's tokens equal the fake-quant torch model's greedy argmax, over a
teacher-forced sequence longer than the prefill bucket and Mistral's window too. Unsupported families and
features are refused with one line. About 15 s per family on 2 cores."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch

from algo.common import AccllmError

FAST = ["--set", "calib_samples=2", "--set", "calib_seqlen=64", "--set", "block_tune_steps=4"]
NEAR_TIE = 0.05          # logits this close may flip under the integer numerics (host.bench_soak.NEAR_TIE_LOGIT)
SLIDING = 16


def _config(kind, **over):
    import transformers
    from algo.models import KNOWN_CONFIGS
    k = KNOWN_CONFIGS["tiny"]
    common = dict(vocab_size=k["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    common.update(over)
    if kind == "llama3":          # Llama-3.2 style; original_max_position_embeddings small so most pairs are scaled
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(**common, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            **common, rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
    if kind == "mistral":
        return transformers.MistralForCausalLM, transformers.MistralConfig(
            **common, sliding_window=SLIDING, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    raise ValueError(kind)


def make_model_dir(kind, out, **over):
    """A random-init model of *kind* saved with save_pretrained (+ SmolLM2's tokenizer); biases random
    (transformers initializes them to zero, which would not test them) and q/k weights 3x larger (with the
    0.02 init every score is near 0, attention a plain average, and RoPE would hardly matter)."""
    from algo.models import smollm2_tokenizer
    cls, cfg = _config(kind, **over)
    torch.manual_seed(1)
    m = cls(cfg).float()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.5)
            elif n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(3)
    m.save_pretrained(out)
    smollm2_tokenizer().save_pretrained(out)
    return out


def _cli(argv):
    from host import cli
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module", params=["llama3", "qwen2", "mistral"])
def family_pkg(request, tmp_path_factory):
    from host import cli
    d = tmp_path_factory.mktemp(request.param)
    src = make_model_dir(request.param, d / "model")
    pkg = d / "pkg"
    assert cli.compile_model_main(["--model", str(src), "--recipe", "accllm", "--hw", "sim-small", "--out", str(pkg),
                                   "--no-progress", *FAST]) == 0
    return request.param, src, pkg


def _reference(pkg_dir, ids):
    """Logits of the package's fake-quant torch model (with its cache) for *ids* fed in one block."""
    from algo.eval import HFScorer
    from quant.package import load_package
    pkg = load_package(pkg_dir)
    model = pkg.to_torch_model()
    sc = HFScorer(model, cache_factory=pkg.cache_factory(model))
    s = sc.new_session()
    return sc, s, sc.forward(s, torch.tensor(ids))


def _emu_rows(pkg_dir, ids):
    from host.runtime import open_runtime
    with open_runtime(pkg_dir, "emu") as rt:
        return np.asarray(rt.feed(ids, want="all"), np.float64)


def _err_vs(rows, model, cache_factory, ids):
    """max |emu logits - logits of *model* with *cache_factory*| over *ids* fed in one block."""
    from algo.eval import HFScorer
    sc = HFScorer(model, cache_factory=cache_factory)
    return float(np.abs(rows - sc.forward(sc.new_session(), torch.tensor(ids)).double().numpy()).max())


def _agree(emu_rows, ref_rows):
    """Positions where the emu's argmax differs from the reference's beyond a near tie."""
    bad = []
    for i, (e, r) in enumerate(zip(emu_rows, ref_rows)):
        a, b = int(np.argmax(e)), int(torch.argmax(r))
        if a != b and float(r[b] - r[a]) > NEAR_TIE:
            bad.append((i, a, b, float(r[b] - r[a])))
    return bad


def test_family_runs_on_emu_as_the_fake_quant_model(family_pkg):
    kind, src, pkg = family_pkg
    from host.runtime import open_runtime
    # accllm run --backend emu: its tokens are the fake-quant model's greedy tokens
    rc, out = _cli(["run", "--package", str(pkg), "--backend", "emu", "--prompt", "The capital of France is",
                    "--max-new-tokens", "6", "--json", "--ignore-eos"])
    assert rc == 0
    toks = json.loads(out.strip().splitlines()[-1])["tokens"]
    with open_runtime(pkg, "emu") as rt:
        prompt = rt.encode("The capital of France is")
    sc, s, lg = _reference(pkg, prompt)
    ref = []
    for i in range(6):
        if i:
            lg = sc.forward(s, torch.tensor([toks[i - 1]]))
        b = int(torch.argmax(lg[-1]))
        assert b == toks[i] or float(lg[-1][b] - lg[-1][toks[i]]) <= NEAR_TIE, (kind, i, toks, ref)
        ref.append(b)
    # teacher-forced: 48 tokens (a full 32-token prefill bucket, then more; past Mistral's 16-token window)
    ids = list(range(300, 348))
    with open_runtime(pkg, "emu") as rt:
        rows = np.asarray(rt.feed(ids, want="all"), np.float64)
    _, _, ref_rows = _reference(pkg, ids)
    assert rows.shape == tuple(ref_rows.shape)
    assert _agree(rows, ref_rows) == []
    err = float(np.abs(rows - ref_rows.double().numpy()).max())
    assert err < 0.5 * float(ref_rows.std()), err         # measured 0.04-0.075 against a std of 0.23
    assert len({int(np.argmax(r)) for r in rows}) > 3            # the positions do not all predict one token


def test_qwen2_biases_are_packaged_compiled_and_matter(family_pkg):
    kind, src, pkg = family_pkg
    if kind != "qwen2":
        pytest.skip("Qwen2 only")
    from quant.package import load_package
    p = load_package(pkg)
    lay = p.manifest["layers"]["model.layers.1.self_attn.k_proj"]
    assert lay["bias"] == "model.layers.1.self_attn.k_proj.bias" and "o_proj" not in str(
        [n for n, x in p.manifest["layers"].items() if x.get("bias")])
    mm = json.loads((pkg / "memmap.json").read_text())
    assert mm["buffers"]["io"]["file"] == "io.bin" and mm["qkv_bias"]["width"] == 256
    assert (pkg / "io.bin").stat().st_size == 2 * 32 * 1024          # layers x max_prefill x stride32(256)
    assert "io.bin" in p.manifest["files"]
    assert (pkg / "program.lst").read_text().count("[q|k|v] += [b_q|b_k|b_v]") == 2 * len(mm["entries"]["prefill"]) + 2
    # without the biases the reference is another model: the emu's logits follow the biased one
    ids = list(range(300, 340))
    rows = _emu_rows(pkg, ids)
    model = p.to_torch_model()
    e_with = _err_vs(rows, model, p.cache_factory(model), ids)
    for layer in model.model.layers:
        for n in "qkv":
            getattr(layer.self_attn, f"{n}_proj").bias = None
    e_without = _err_vs(rows, model, p.cache_factory(model), ids)
    assert e_without > 5 * e_with, (e_with, e_without)


def test_llama3_rope_table_matches_transformers(family_pkg):
    kind, src, pkg = family_pkg
    if kind != "llama3":
        pytest.skip("llama3 only")
    from hw import numerics as nx
    from quant.package import load_package
    p = load_package(pkg)
    off = json.loads((pkg / "memmap.json").read_text())["descriptors"]["rope"]
    F = np.fromfile(pkg / "hbm_w0.bin", np.uint8)[off:off + 4 * 16].view("<u4").astype(np.float64)
    hf = p.to_torch_model().model.rotary_emb.inv_freq.double().numpy()     # transformers' llama3 init (float32)
    words = hf * 2.0 ** 32 / (2 * np.pi)
    # the table is round(inv_freq * 2**32 / 2pi) of the float64 formula; transformers computes in float32
    assert np.all(np.abs(F - words) <= 0.5 + words * 2.0 ** -22)
    plain_inv = 1.0 / (500000.0 ** (np.arange(0, 32, 2) / 32))
    assert (F != nx.rope_freq_words(plain_inv)).sum() >= 8          # the scaling changed most of the 16 frequencies
    # the emu follows the scaled model, not the one with plain RoPE (40 tokens: past the 16-position band)
    ids = list(range(300, 340))
    rows = _emu_rows(pkg, ids)
    model = p.to_torch_model()
    e_scaled = _err_vs(rows, model, p.cache_factory(model), ids)
    plain = p.to_torch_model()
    plain.model.rotary_emb.inv_freq = torch.tensor(plain_inv, dtype=torch.float32)
    e_plain = _err_vs(rows, plain, p.cache_factory(plain), ids)
    assert e_plain > 2 * e_scaled, (e_scaled, e_plain)


def test_mistral_sliding_window_is_lambda_with_no_sinks(family_pkg, tmp_path):
    kind, src, pkg = family_pkg
    if kind != "mistral":
        pytest.skip("Mistral only")
    from algo.attention import make_cache_factory
    from algo.models import family_recipe, load_model
    from algo.recipe import load_recipe
    man = json.loads((pkg / "manifest.json").read_text())
    assert (man["recipe"]["attention"], man["recipe"]["sink_tokens"], man["recipe"]["window"]) == ("lambda", 4, SLIDING)
    # full attention is Λ with 0 sinks and the model's window: exactly transformers' sliding-window model
    full, note = family_recipe(load_recipe("fp"), man["model_config"])
    assert (full.attention, full.sink_tokens, full.window) == ("lambda", 0, SLIDING) and "sliding_window=16" in note
    lm = load_model(str(src))
    ids = torch.arange(300, 340)
    with torch.no_grad():
        ref = lm.model(ids[None]).logits[0]                  # stock Mistral, its own sliding-window mask
    from algo.eval import HFScorer
    sc = HFScorer(lm.model, cache_factory=make_cache_factory(lm.model, full))
    got = sc.forward(sc.new_session(), ids)
    assert torch.allclose(got, ref, atol=1e-5)
    # the emu follows the windowed package model, not the same weights with a 1024-token window
    from algo.recipe import recipe_from_dict
    from quant.package import load_package
    p = load_package(pkg)
    rows = _emu_rows(pkg, ids.tolist())
    model = p.to_torch_model()
    e_win = _err_vs(rows, model, p.cache_factory(model), ids.tolist())
    wide = recipe_from_dict(dict(p.manifest["recipe"], window=1024))
    e_wide = _err_vs(rows, model, make_cache_factory(model, wide, p.kv_hook()), ids.tolist())
    assert e_wide > 2 * e_win, (e_win, e_wide)
    # a Λ window past the model's is refused by the compiler (compile --package --set window=...)
    from hw.compiler import compile_to_dir
    from hw.config import load_hw
    from quant.package import Package
    man2 = dict(p.manifest, recipe=dict(p.manifest["recipe"], window=64))
    with pytest.raises(AccllmError, match="sliding_window=16"):
        compile_to_dir(Package(p.dir, man2), load_hw("sim-small"), tmp_path, progress=False)


REFUSED = [
    ("gemma", dict(architectures=["GemmaForCausalLM"], model_type="gemma"), "unsupported architecture GemmaForCausalLM"),
    ("moe", dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=8),
     "unsupported architecture MixtralForCausalLM"),
    ("yarn", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
     "RoPE type 'yarn' is not supported; accepted rope_type: default, linear, llama3"),
    ("dynamic", dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "RoPE type 'dynamic'"),
    ("llama3-incomplete", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "llama3 needs a positive low_freq_factor"),
    ("qwen2-sliding", dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
                           sliding_window=4096, max_window_layers=1), "use_sliding_window=true"),
    ("llama-o-bias", dict(attention_bias=True), "attention_bias=true"),
    ("gelu", dict(hidden_act="gelu"), "hidden_act='gelu'"),
]


@pytest.mark.parametrize("name,change,msg", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_families_and_features_are_refused(tmp_path, name, change, msg, capsys):
    from host import cli
    from algo.models import check_model_config
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
           "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 49152,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    cfg.update(change)
    with pytest.raises(AccllmError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        check_model_config(cfg, "m")
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    # compile-model refuses it before any work, in one line
    rc = cli.compile_model_main(["--model", str(d), "--recipe", "accllm", "--hw", "sim-small", "--out",
                                 str(tmp_path / "p"), "--no-progress", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and msg.split(";")[0] in err[0], err


def test_export_refuses_other_families(family_pkg, tmp_path):
    kind, src, pkg = family_pkg
    from quant.export import export_compressed_tensors, export_gguf
    if kind == "llama3":
        with pytest.raises(AccllmError, match="RoPE type 'llama3' is not exported to GGUF"):
            export_gguf(pkg, tmp_path / "m.gguf")
        return
    for f in (export_gguf, export_compressed_tensors):
        with pytest.raises(AccllmError, match="is not a Llama model"):
            f(pkg, tmp_path / "x")
