"""``accllm bench compile-7b --out DIR``: compile a model of Llama-2-7B's shape on this machine, block-streamed.

A random-weight model with Llama-2-7B's configuration (32 layers, hidden 4096, 32 heads, 32 KV heads,
intermediate 11008, vocab 32000; ``--layers`` and ``--hidden`` scale it down for a quick check) is written
once as sharded fp16 safetensors with config.json and a tokenizer into the accllm cache
(``cache_dir("models")``, reused when present). The tokenizer is SmolLM2's byte-level BPE cut to the first
32000 tokens (the merges that build them), so every id fits the embedding and the package carries it.
The model is compiled by ``compile-model --recipe accllm --hw u280 --stream-blocks on`` in a child process
(its peak RSS is the compile's own) with the recipe's data-driven steps replaced by their data-free
stand-ins: magnitude 2:4 pruning for SparseGPT, RTN for GPTQ, no block tuning (on 2 CPU cores GPTQ and
block tuning of 7B would take hours), 4 calibration windows of 128 tokens for the KV-cache constants.
Then the package is loaded (every sha256 checked), ``accllm perf --package`` reads its dimensions, and
``accllm run --backend emu`` decodes a few tokens from it. Reported: time and peak RSS per build step and
in all, the package size, the perf projection, the tokens."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from algo.common import AccllmError

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0)
# the recipe's data-driven steps replaced by data-free stand-ins (module doc)
STAND_INS = ["prune_method=magnitude", "weight_method=rtn", "act_order=false", "block_tune_steps=0",
             "calib_samples=4", "calib_seqlen=128"]
SHARD_BYTES = 1 << 30
SEED = 0


def _shape(layers: int | None, hidden: int | None) -> dict:
    cfg = dict(LLAMA2_7B)
    if layers is not None:
        if not 1 <= layers <= 32:
            raise AccllmError(f"--layers {layers}: accepted 1 to 32 (Llama-2-7B has 32)")
        cfg["num_hidden_layers"] = layers
    if hidden is not None:
        if hidden % 128 or not 128 <= hidden <= 4096:
            raise AccllmError(f"--hidden {hidden}: accepted a multiple of 128 (the head size) from 128 to 4096")
        heads = hidden // 128
        inter = -(-round(hidden * 11008 / 4096) // 64) * 64           # Llama-2's ratio, a multiple of 64
        cfg.update(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=heads)
    return cfg


def _tokenizer(vocab: int):
    """SmolLM2's tokenizer cut to its first *vocab* ids (the merges that build them kept)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from algo.models import smollm2_tokenizer
    base = smollm2_tokenizer()
    d = json.loads(base.backend_tokenizer.to_str())
    kept = {t: i for t, i in d["model"]["vocab"].items() if i < vocab}
    merges = []
    for m in d["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in kept and b in kept and a + b in kept:
            merges.append(m)
    d["model"]["vocab"], d["model"]["merges"] = kept, merges
    d["added_tokens"] = [t for t in d["added_tokens"] if t["id"] < vocab]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(d)),
                                  bos_token=base.bos_token, eos_token=base.eos_token, unk_token=base.unk_token,
                                  pad_token=base.pad_token)
    return tok


def _write_model(d: Path, cfg: dict, log) -> None:
    """config.json, the tokenizer and random fp16 weights in shards of about 1 GiB (std 0.02, norms 1)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    from algo.common import atomic_directory
    conf = LlamaConfig(**cfg, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                       architectures=["LlamaForCausalLM"], torch_dtype="float16")
    h, i, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hkv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = [("model.embed_tokens.weight", (V, h))]
    for li in range(L):
        p = f"model.layers.{li}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (hkv, h)),
                   (p + "self_attn.v_proj.weight", (hkv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (V, h))]
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    with atomic_directory(d) as tmp:
        conf.save_pretrained(str(tmp))
        _tokenizer(V).save_pretrained(str(tmp))
        index, shard, size, n = {}, {}, 0, 0

        def flush():
            nonlocal shard, size, n
            if shard:
                name = f"model-{n:05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                index.update({k: name for k in shard})
                n, shard, size = n + 1, {}, 0
        total = sum(2 * (a[0] * (a[1] if len(a) > 1 else 1)) for _, a in shapes)
        for name, shape in shapes:
            t = (torch.ones(shape) if name.endswith("norm.weight")
                 else torch.empty(shape).normal_(0.0, 0.02, generator=gen)).to(torch.float16)
            shard[name] = t
            size += t.numel() * 2
            if size >= SHARD_BYTES:
                flush()
                log(f"wrote {len(index)} of {len(shapes)} tensors ({time.time() - t0:.0f} s)")
        flush()
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": index}, indent=1))
        (tmp / "accllm-random.json").write_text(json.dumps({"seed": SEED, "config": cfg}))


def model_dir(cfg: dict, log) -> Path:
    """The random model of shape *cfg* in the accllm cache (written once)."""
    from algo.common import cache_dir
    L, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    d = cache_dir("models") / f"random-llama2-7b-shape-L{L}-h{h}"
    marker = d / "accllm-random.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == {"seed": SEED, "config": cfg}:
                return d
        except ValueError:
            pass
    log(f"writing a random fp16 model of Llama-2-7B's shape ({L} layers, hidden {h}) into {d} (once) ...")
    _write_model(d, cfg, log)
    return d


def _child(argv: list[str], what: str) -> dict:
    """Run ``accllm ARGV --json`` in a child process (its progress on our stderr); its JSON document."""
    r = subprocess.run([sys.executable, "-m", "host.cli", *argv, "--json"], stdout=subprocess.PIPE, text=True,
                       cwd=str(Path(__file__).resolve().parents[1]))
    if r.returncode != 0:
        raise AccllmError(f"{what} failed (exit {r.returncode}): accllm {' '.join(argv)}")
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise AccllmError(f"{what}: accllm {' '.join(argv)} printed no JSON document") from None


def bench_compile_7b(args) -> dict:
    out = getattr(args, "out", None)
    if not out:
        raise AccllmError("bench compile-7b needs --out DIR (the package directory to write)")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    cfg = _shape(getattr(args, "layers", None), getattr(args, "hidden", None))
    t0 = time.time()
    d = model_dir(cfg, log)
    t_model = time.time() - t0
    compile_argv = ["compile", "--model", str(d), "--recipe", "accllm", "--hw", "u280", "--stream-blocks", "on",
                    "--out", str(out), *[x for s in STAND_INS for x in ("--set", s)]]
    if getattr(args, "no_progress", False):
        compile_argv.append("--no-progress")
    log("compiling: accllm " + " ".join(compile_argv))
    built = _child(compile_argv, "compiling the model")
    from quant.package import load_package
    pkg = load_package(out)                             # every file's sha256 checked
    perf = _child(["perf", "--package", str(out)], "accllm perf --package")
    tokens = getattr(args, "tokens", None) or 3
    ran = _child(["run", "--package", str(out), "--backend", "emu", "--prompt", "The capital of France is",
                  "--max-new-tokens", str(tokens), "--ignore-eos"], "accllm run --backend emu")
    mc = pkg.manifest["model_config"]
    return {"bench": "compile-7b", "model_dir": str(d), "model_write_seconds": round(t_model, 1),
            "config": {k: mc[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                          "num_key_value_heads", "intermediate_size", "vocab_size")},
            "package": str(out), "recipe": "accllm", "recipe_sets": STAND_INS, "hw": "u280",
            "stand_ins": "magnitude 2:4 pruning instead of SparseGPT, RTN instead of GPTQ (act order off), no block "
                         "tuning; 4 calibration windows of 128 tokens (KV-cache constants)",
            "seconds": built["seconds"], "peak_rss_mb": max(s["peak_rss_mb"] for s in built["steps"]),
            "steps": built["steps"], "package_bytes": sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file()),
            "bits_per_weight_blocks": built["footprint"].get("bits_per_weight_blocks"),
            "perf": {k: perf.get(k) for k in ("decode_tokens_per_s", "bytes_per_token", "model") if k in perf},
            "emu_tokens": ran.get("tokens") or ran.get("token_ids"), "emu_text": ran.get("text"),
            "emu_ttft_s": ran.get("ttft_s"), "emu_decode_tokens_per_s": ran.get("decode_tokens_per_s")}
