"""Export of a package's weights for other runtimes (``accllm export``; docs/export.md).

* :func:`export_gguf`: one GGUF file for llama.cpp's ``llama`` architecture (llama metadata keys,
  llama.cpp tensor names, the package's tokenizer as a GPT-2 BPE vocabulary). A quantized linear
  layer becomes Q8_0 blocks (32 values, one fp16 scale ``d``) with ``d`` = the group's fp16 scale and
  ``q`` = code − zero, which is bit-exact whenever the group size is a multiple of 32 and every
  code − zero lies in [−128, 127] (always for W2/W3/W4, not always for W8); other tensors are F16 where
  every value is an fp16 number, else F32 (or F16, rounded, with ``inexact="f16"``). Every tensor's
  type and exactness is measured (the written blocks are dequantized with ``gguf.quants`` and
  compared with the package's dequantized weight) and reported.
* :func:`export_compressed_tensors`: a Hugging Face model directory in compressed-tensors'
  ``pack-quantized`` format (config.json with its ``quantization_config``, model.safetensors, the
  tokenizer files). Codes and zero points are packed as compressed-tensors packs them (the format is
  written here with numpy and safetensors; the compressed-tensors library only reads it); scales are
  stored in float32 by default, holding the package's fp16 values, so that compressed-tensors'
  dequantization ``(q − zero) · scale`` in the scale's dtype is exact in float32.

The exports carry weights only: 8-bit activations, the 4-bit KV cache, Λ-shaped attention and SpAtten
are the package's recipe for the accelerator and are not reproduced by llama.cpp or transformers;
2:4 sparsity is stored densely (pruned weights are zeros).

An export is written to a temporary path beside OUT and renamed into place; an existing OUT is replaced
only when an earlier export wrote it (a GGUF with the ``accllm.package.manifest_sha256`` key, a
directory with ``accllm-export.json``).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from algo.common import AccllmError, atomic_directory, sha256_file

from .pack import pack_bits
from .package import MANIFEST, Package, load_package
from .quantizers import dequant_weight

FORMATS = ("gguf", "compressed-tensors")
MARKER_KEY = "accllm.package.manifest_sha256"        # GGUF key that marks an accllm export
MARKER_FILE = "accllm-export.json"                   # file that marks an accllm compressed-tensors export
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")

# HF LlamaForCausalLM module path inside a decoder layer -> llama.cpp tensor name
LLAMA_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
Q8_0_BLOCK = 32
Q8_0_DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", (Q8_0_BLOCK,))])    # ggml's block_q8_0: 34 bytes


# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------

def not_reproduced(recipe) -> list[str]:
    """What of the package's recipe the exported weights do not carry (what llama.cpp and transformers
    will not reproduce)."""
    from algo.recipe import _ratio_active
    out = []
    if recipe.act_bits:
        out.append(f"{recipe.act_bits}-bit activations ({recipe.act_scheme}): the runtime computes linear inputs "
                   f"in its own precision")
    if recipe.kv_bits:
        out.append(f"{recipe.kv_bits}-bit KV cache: the runtime keeps its own KV cache")
    if recipe.attention == "lambda":
        out.append(f"Λ-shaped attention ({recipe.sink_tokens} sink tokens + {recipe.window}-token window): the "
                   f"runtime attends to every token")
    if _ratio_active(recipe.token_keep) or _ratio_active(recipe.head_keep):
        out.append("SpAtten token/head pruning: the runtime attends to every token and head")
    if recipe.nm:
        out.append(f"{recipe.sparsity} sparsity: stored densely (pruned weights are zeros), computed as dense "
                   f"weights")
    return out


def _check_llama(pkg: Package) -> dict:
    mc = pkg.manifest["model_config"]
    archs = mc.get("architectures") or []
    if mc.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise AccllmError(f"package {pkg.dir}: model {mc.get('model_type')!r} is not a Llama model; the "
                          f"export writes Llama (LlamaForCausalLM / llama.cpp 'llama') models only")
    for key in ("attention_bias", "mlp_bias"):
        if mc.get(key):
            raise AccllmError(f"package {pkg.dir}: {key} is set; linear biases are not exported")
    return mc


def _rope(mc: dict) -> tuple[float, str]:
    rp = mc.get("rope_parameters") or {}
    theta = float(rp.get("rope_theta", mc.get("rope_theta", 10000.0)))
    rtype = rp.get("rope_type") or (mc.get("rope_scaling") or {}).get("rope_type") or "default"
    return theta, rtype


def _linear_names(pkg: Package) -> list[str]:
    return list(pkg.manifest["layers"])


def _quant_parts(pkg: Package, name: str):
    """(codes int64 numpy [N,K], zeros int64 [N,K/g], scales fp16 torch [N,K/g], bits, group) of a
    quantized layer (pruned positions have code == zero)."""
    codes, zeros, scales, _mask, b, g = pkg.linear(name)
    return codes.numpy(), zeros.numpy(), scales, b, g


def dequantized(pkg: Package, name: str) -> torch.Tensor:
    """The package's dequantized weight of linear layer *name* (float32 [N, K]): what its fake-quant
    torch model (Package.to_torch_model) computes with."""
    lay = pkg.manifest["layers"][name]
    if lay.get("tied_to"):
        return pkg.tensor(lay["tied_to"]).float()
    if lay.get("bits"):
        codes, zeros, scales, _mask, _b, g = pkg.linear(name)
        return dequant_weight(codes, zeros, scales, g)
    return pkg.tensor(f"{name}.weight").float()


def _describe(lay: dict) -> str:
    if lay.get("tied_to"):
        return f"tied to {lay['tied_to']}"
    if not lay.get("bits"):
        return "float (fp16)"
    s = f"W{lay['bits']} g{lay['group']}"
    return s + (f", {lay['sparsity']} sparse" if lay.get("sparsity", "none") != "none" else "")


_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_string_keys(path: str | os.PathLike, wanted: set[str]) -> dict[str, str]:
    """The string values of the *wanted* metadata keys of a GGUF file, reading its key/value section
    only as far as needed (gguf.GGUFReader parses every token of a vocabulary first: seconds)."""
    import struct
    found: dict[str, str] = {}
    with open(path, "rb") as f:
        def read(fmt):
            n = struct.calcsize(fmt)
            b = f.read(n)
            if len(b) != n:
                raise ValueError("truncated")
            return struct.unpack(fmt, b)[0]

        def string():
            return f.read(read("<Q")).decode("utf-8", "replace")

        def skip(vtype):
            if vtype == 8:
                f.seek(read("<Q"), 1)
            elif vtype == 9:
                etype, count = read("<I"), read("<Q")
                if etype in _GGUF_SCALAR:
                    f.seek(struct.calcsize(_GGUF_SCALAR[etype]) * count, 1)
                else:
                    for _ in range(count):
                        skip(etype)
            elif vtype in _GGUF_SCALAR:
                f.seek(struct.calcsize(_GGUF_SCALAR[vtype]), 1)
            else:
                raise ValueError(f"unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        read("<I")
        read("<Q")
        n_kv = read("<Q")
        for _ in range(n_kv):
            key, vtype = string(), read("<I")
            if key in wanted and vtype == 8:
                found[key] = string()
                if len(found) == len(wanted):
                    break
            else:
                skip(vtype)
    return found


def _out_is_ours_gguf(out: Path) -> bool:
    if not out.is_file():
        return False
    try:
        return MARKER_KEY in gguf_string_keys(out, {MARKER_KEY})
    except (OSError, ValueError):
        return False


def _check_out(out: Path, fmt: str) -> None:
    if not out.exists() and not out.is_symlink():
        if not out.parent.is_dir():
            raise AccllmError(f"{out}: its directory {out.parent} does not exist")
        return
    ours = _out_is_ours_gguf(out) if fmt == "gguf" else (out.is_dir() and (out / MARKER_FILE).is_file())
    if not ours:
        what = "directory" if out.is_dir() else "file"
        raise AccllmError(f"{out} exists and is not an earlier accllm {fmt} export (a {what} accllm did not "
                          f"write); remove it or choose another OUT")


def _load(package: str | os.PathLike) -> Package:
    p = Path(package)
    if p.is_file() and p.name == MANIFEST:
        p = p.parent
    return load_package(p)


def _provenance(pkg: Package) -> dict:
    man = pkg.manifest
    return {"package": str(pkg.dir), "manifest_sha256": man["manifest_sha256"], "source": man.get("source"),
            "recipe": man["recipe"], "tool_version": man.get("tool_version")}


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------

def q8_0_from_codes(codes: np.ndarray, zeros: np.ndarray, scales, group: int):
    """ggml Q8_0 blocks (uint8 [N, K/32*34]) holding exactly scale·(code − zero) of a group-quantized
    weight, or (None, why) when Q8_0 cannot hold it: a group that is not a multiple of 32 (a block would
    need two scales), K not a multiple of 32, or a code − zero outside int8 [−128, 127]. Each block's d
    is its group's fp16 scale, bit for bit, and q = code − zero, so ggml's d·q (fp16 d widened to fp32,
    times an integer of at most 8 bits) equals the package's float32 scale·(code − zero) exactly."""
    n, k = codes.shape
    if k % Q8_0_BLOCK:
        return None, f"K={k} is not a multiple of {Q8_0_BLOCK}"
    if group % Q8_0_BLOCK:
        return None, f"group {group} is not a multiple of {Q8_0_BLOCK} (a Q8_0 block would span two scales)"
    v = codes.astype(np.int16) - np.repeat(zeros.astype(np.int16), group, axis=1)
    lo, hi = int(v.min()), int(v.max())
    if lo < -128 or hi > 127:
        return None, f"code − zero spans [{lo}, {hi}], outside Q8_0's int8 [-128, 127]"
    sc = scales.numpy() if torch.is_tensor(scales) else np.asarray(scales)
    blocks = np.empty((n, k // Q8_0_BLOCK), dtype=Q8_0_DTYPE)
    blocks["d"] = np.repeat(sc.astype(np.float16), group // Q8_0_BLOCK, axis=1)
    blocks["qs"] = v.astype(np.int8).reshape(n, k // Q8_0_BLOCK, Q8_0_BLOCK)
    return blocks.view(np.uint8).reshape(n, -1), f"d = the group's fp16 scale, q = code − zero in [{lo}, {hi}]"


def rope_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns a Hugging Face q_proj/k_proj weight (rotate-half RoPE: the two halves of
    each head's dimensions) into llama.cpp's (adjacent pairs): ``w_gguf = w_hf[order]``."""
    hd = n_rows // n_head
    return np.arange(n_rows).reshape(n_head, 2, hd // 2).swapaxes(1, 2).reshape(-1)


def _gguf_float(w: np.ndarray, inexact: str):
    """(array, exact, note) of a float32 tensor as F16 when every value is an fp16 number, else F32
    (or F16 rounded to nearest when inexact == 'f16')."""
    w16 = w.astype(np.float16)
    if np.array_equal(w16.astype(np.float32), w):
        return w16, True, "every value is an fp16 number"
    if inexact == "f16":
        err = float(np.abs(w16.astype(np.float32) - w).max())
        return w16, False, f"rounded to fp16 (max |error| {err:.3g})"
    return w.astype(np.float32), True, "values need more than fp16 (float32)"


@contextlib.contextmanager
def tokenizer_dir(pkg: Package):
    """A directory with the package's tokenizer files: the package itself, or (older packages of the
    embedded models, which carry none) SmolLM2's tokenizer saved to a temporary directory; None when
    neither exists."""
    if (pkg.dir / "tokenizer.json").is_file():
        yield pkg.dir
        return
    if (pkg.manifest.get("source") or {}).get("spec") in ("tiny", "smollm2-135m"):
        from algo.models import smollm2_tokenizer
        with tempfile.TemporaryDirectory(prefix="accllm-tokenizer-") as t:
            smollm2_tokenizer().save_pretrained(t)
            yield Path(t)
        return
    yield None


def _gguf_tokenizer(pkg: Package, mc: dict, writer, d: Path | None) -> dict:
    """The tokenizer in directory *d* as GGUF tokenizer keys (GPT-2 byte-level BPE), or 'none'."""
    import gguf
    tj = (d or pkg.dir) / "tokenizer.json"
    n_vocab = int(mc["vocab_size"])
    if not tj.is_file():
        writer.add_tokenizer_model("none")
        return {"model": "none", "note": "the package carries no tokenizer.json: llama.cpp needs token ids"}
    t = json.loads(tj.read_text(encoding="utf-8"))
    model, dec = t.get("model") or {}, t.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or dec.get("type") != "ByteLevel":
        writer.add_tokenizer_model("none")
        return {"model": "none", "note": f"tokenizer.json is {model.get('type')} with a {dec.get('type')} decoder, "
                                         f"not a byte-level BPE: llama.cpp needs token ids"}
    vocab = dict(model["vocab"])
    added = {a["id"]: a for a in t.get("added_tokens") or []}
    rev = {i: s for s, i in vocab.items()}
    rev.update({i: a["content"] for i, a in added.items()})
    if rev and max(rev) >= n_vocab:
        raise AccllmError(f"package {d}: tokenizer.json has token id {max(rev)} >= vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(rev[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    pre, pre_note = _bpe_pre(pkg)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(d, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tj))
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    adds_bos = len(full) > len(plain) and full[-len(plain):] == plain
    adds_eos = len(full) > len(plain) and full[:len(plain)] == plain
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(adds_bos)
    if "eos" not in special.add_special_token:
        writer.add_add_eos_token(adds_eos)
    info = {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
            "special_token_ids": dict(special.special_token_ids), "chat_template": special.chat_template is not None}
    if pre_note:
        info["note"] = pre_note
    return info


def _bpe_pre(pkg: Package) -> tuple[str, str | None]:
    """llama.cpp's pre-tokenizer name for the package's tokenizer: taken from the GGUF the package's
    model came from (SmolLM2's for the embedded models, whose tokenizer the package carries) when that
    file is here; else 'default' (llama.cpp's generic GPT-2 split)."""
    src = pkg.manifest.get("source") or {}
    path = None
    if str(src.get("path", "")).lower().endswith(".gguf") and Path(src["path"]).is_file():
        path = Path(src["path"])
    elif src.get("spec") in ("tiny", "smollm2-135m"):        # both carry SmolLM2's tokenizer
        with contextlib.suppress(AccllmError):
            from algo.models import _smollm2_gguf
            path = _smollm2_gguf()
    if path is not None:
        with contextlib.suppress(OSError, ValueError):
            pre = gguf_string_keys(path, {"tokenizer.ggml.pre"}).get("tokenizer.ggml.pre")
            if pre:
                return pre, None
    return "default", ("pre-tokenizer unknown (the package's source GGUF is not here): llama.cpp's 'default' "
                       "GPT-2 split may tokenize some text differently from the package's tokenizer")


def export_gguf(package: str | os.PathLike, out: str | os.PathLike, inexact: str = "f32",
                progress=None) -> dict:
    """Write *package* as a llama.cpp GGUF file *out*; returns the report (per tensor: type, exact)."""
    import gguf
    if inexact not in ("f32", "f16"):
        raise AccllmError(f"inexact must be f32 or f16, got {inexact!r}")
    out = Path(out)
    pkg = _load(package)
    _check_out(out, "gguf")
    mc = _check_llama(pkg)
    theta, rtype = _rope(mc)
    if rtype != "default":
        raise AccllmError(f"package {pkg.dir}: RoPE type {rtype!r} is not exported to GGUF (default RoPE only)")
    n_head, n_kv = int(mc["num_attention_heads"]), int(mc.get("num_key_value_heads") or mc["num_attention_heads"])
    hidden, n_layers = int(mc["hidden_size"]), int(mc["num_hidden_layers"])
    head_dim = int(mc.get("head_dim") or hidden // n_head)
    tensors: list[dict] = []
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_string(MARKER_KEY, pkg.manifest["manifest_sha256"])      # early: found by a short header scan
        w.add_name(f"accllm {pkg.recipe.name} of {(pkg.manifest.get('source') or {}).get('spec', 'a model')}")
        w.add_context_length(int(mc["max_position_embeddings"]))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(mc["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(theta)
        w.add_rope_dimension_count(head_dim)
        if head_dim * n_head != hidden:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_layer_norm_rms_eps(float(mc["rms_norm_eps"]))
        w.add_vocab_size(int(mc["vocab_size"]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        with tokenizer_dir(pkg) as tdir:
            tok_info = _gguf_tokenizer(pkg, mc, w, tdir)
        w.add_string("accllm.recipe", json.dumps(pkg.manifest["recipe"], sort_keys=True))
        nr = not_reproduced(pkg.recipe)
        if nr:
            w.add_array("accllm.not_reproduced", nr)

        def put(gname, src, arr, qtype, exact, note, raw=False):
            if raw:
                w.add_tensor(gname, arr, raw_dtype=qtype)
            else:
                w.add_tensor(gname, arr)
            tensors.append({"tensor": gname, "from": src, "type": qtype.name, "exact": bool(exact),
                            "bytes": int(arr.nbytes), "note": note})

        def gguf_name(hf: str) -> str:
            if hf == "model.embed_tokens.weight":
                return "token_embd.weight"
            if hf == "model.norm.weight":
                return "output_norm.weight"
            if hf == "lm_head":
                return "output.weight"
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+?)(\.weight)?", hf)
            if not m or m.group(2) not in LLAMA_BLOCK_NAMES:
                raise AccllmError(f"package {pkg.dir}: tensor {hf} has no llama.cpp name")
            return f"blk.{m.group(1)}.{LLAMA_BLOCK_NAMES[m.group(2)]}.weight"

        emb = pkg.tensor("model.embed_tokens.weight").float().numpy()
        a, exact, note = _gguf_float(emb, inexact)
        put("token_embd.weight", "model.embed_tokens.weight", a, gguf.GGMLQuantizationType(_qtype(a)), exact,
            note)
        names = [n for n in pkg.manifest["tensors"] if pkg.manifest["tensors"][n]["kind"] == "norm"]
        for n in names:               # norms: F32 (what llama.cpp's converter writes for 1-D tensors)
            a = pkg.tensor(n).float().numpy()
            put(gguf_name(n), n, a, gguf.GGMLQuantizationType.F32, True, "fp16 values in float32")
        for i, name in enumerate(_linear_names(pkg)):
            if progress:
                progress(i, name)
            lay = pkg.manifest["layers"][name]
            if lay.get("tied_to"):
                tensors.append({"tensor": "output.weight", "from": name, "type": None, "exact": True, "bytes": 0,
                                "note": "tied to token_embd.weight (llama.cpp uses the embedding)"})
                continue
            gname = gguf_name(name)
            order = None
            if name.endswith("self_attn.q_proj"):
                order = rope_row_order(lay["out_features"], n_head)
            elif name.endswith("self_attn.k_proj"):
                order = rope_row_order(lay["out_features"], n_kv)
            ref = dequantized(pkg, name).numpy()
            if order is not None:
                ref = ref[order]
            if lay.get("bits"):
                codes, zeros, scales, b, g = _quant_parts(pkg, name)
                blocks, why = q8_0_from_codes(codes, zeros, scales, g)
                if blocks is not None:
                    if order is not None:
                        blocks = np.ascontiguousarray(blocks[order])
                    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(ref.shape)
                    if np.array_equal(back, ref):
                        put(gname, name, blocks, gguf.GGMLQuantizationType.Q8_0, True, f"{_describe(lay)}: {why}",
                            raw=True)
                        continue
                    why = "the Q8_0 blocks do not dequantize to the package's weight"
                a, exact, note = _gguf_float(ref, inexact)
                put(gname, name, a, gguf.GGMLQuantizationType(_qtype(a)), exact,
                    f"{_describe(lay)}: not Q8_0 ({why}); {note}")
            else:
                a, exact, note = _gguf_float(ref, inexact)
                put(gname, name, a, gguf.GGMLQuantizationType(_qtype(a)), exact, f"{_describe(lay)}: {note}")
        counts: dict[str, int] = {}            # general.file_type: the type of most linear weights
        for t in tensors:
            if t["type"] and t["tensor"] != "token_embd.weight" and not t["tensor"].endswith("norm.weight"):
                counts[t["type"]] = counts.get(t["type"], 0) + 1
        major = max(counts, key=counts.get) if counts else "F16"
        w.add_file_type({"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16}.get(
            major, gguf.LlamaFileType.ALL_F32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return {"format": "gguf", "out": str(out), "bytes": out.stat().st_size, **_provenance(pkg),
            "architecture": "llama", "tokenizer": tok_info,
            "exact": all(t["exact"] for t in tensors), "tensors": tensors,
            "not_reproduced": not_reproduced(pkg.recipe)}


def _qtype(a: np.ndarray) -> int:
    import gguf
    return int(gguf.GGMLQuantizationType.F16 if a.dtype == np.float16 else gguf.GGMLQuantizationType.F32)


# ---------------------------------------------------------------------------------------------
# compressed-tensors
# ---------------------------------------------------------------------------------------------

def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors' ``pack_to_int32`` of unsigned *bits*-bit values [R, C] (their signed values
    plus 2^(bits−1)) along dim 1: each row padded with zeros to a multiple of 32 values, element j of a
    row at bit j·bits of the row's little-endian int32 words, ceil(C·bits/32) words per row."""
    r, c = values.shape
    cp = -(-c // 32) * 32
    v = np.zeros((r, cp), dtype=np.uint8)
    v[:, :c] = values
    words = pack_bits(v, bits).view("<i4").reshape(r, cp * bits // 32)
    return np.ascontiguousarray(words[:, : -(-c * bits // 32)])


def _regex_targets(names: list[str], n_layers: int) -> list[str]:
    """compressed-tensors targets for module *names*: one ``re:`` pattern per decoder-layer suffix present
    in every layer, the other names exactly."""
    by_suffix: dict[str, set[int]] = {}
    rest = []
    for n in names:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", n)
        if m:
            by_suffix.setdefault(m.group(2), set()).add(int(m.group(1)))
        else:
            rest.append(n)
    out = []
    for suf, layers in sorted(by_suffix.items()):
        if layers == set(range(n_layers)):
            out.append(r"re:^model\.layers\.\d+\." + re.escape(suf) + "$")
        else:
            rest += [f"model.layers.{i}.{suf}" for i in sorted(layers)]
    return out + sorted(rest)


def export_compressed_tensors(package: str | os.PathLike, out: str | os.PathLike, scale_dtype: str = "float32",
                              progress=None) -> dict:
    """Write *package* as a Hugging Face directory in compressed-tensors' pack-quantized format."""
    from safetensors.numpy import save_file
    if scale_dtype not in ("float32", "float16"):
        raise AccllmError(f"scale dtype must be float32 or float16, got {scale_dtype!r}")
    out = Path(out)
    pkg = _load(package)
    _check_out(out, "compressed-tensors")
    mc = _check_llama(pkg)
    n_layers = int(mc["num_hidden_layers"])
    arrays: dict[str, np.ndarray] = {}
    layers_report = []
    groups: dict[tuple[int, int], list[str]] = {}
    ignore = []
    for n, meta in pkg.manifest["tensors"].items():
        if meta["kind"] in ("embedding", "norm"):
            arrays[n] = pkg.tensor(n).numpy().astype(np.float16)
    sd = np.float32 if scale_dtype == "float32" else np.float16
    # one packed scheme (the decoder blocks'): transformers decompresses every packed layer
    # with the first config group's scheme, so a layer of another scheme is stored dense (exact)
    schemes: dict[tuple[int, int], int] = {}
    for name, lay in pkg.manifest["layers"].items():
        if lay.get("bits") and not lay.get("tied_to"):
            key = (lay["bits"], lay["group"])
            # the decoder blocks' scheme first (lm_head only when no block is quantized)
            weight = lay["in_features"] * lay["out_features"] * (1 if name == "lm_head" else 1 << 40)
            schemes[key] = schemes.get(key, 0) + weight
    main = max(schemes, key=schemes.get) if schemes else None
    tied = False
    for i, name in enumerate(_linear_names(pkg)):
        if progress:
            progress(i, name)
        lay = pkg.manifest["layers"][name]
        if lay.get("tied_to"):
            tied = True
            layers_report.append({"layer": name, "format": "tied", "exact": True,
                                  "note": f"tie_word_embeddings: the weight is {lay['tied_to']}"})
            continue
        if not lay.get("bits") or (lay["bits"], lay["group"]) != main:
            w = dequantized(pkg, name).numpy()
            w16 = w.astype(np.float16)
            dense = w16 if np.array_equal(w16.astype(np.float32), w) else w
            arrays[f"{name}.weight"] = dense
            ignore.append(name)
            why = ("float layer" if not lay.get("bits") else
                   f"{_describe(lay)}, not the packed scheme W{main[0]} g{main[1]} (one packed scheme per export)")
            layers_report.append({"layer": name, "format": f"dense {dense.dtype}", "exact": True,
                                  "note": f"{why}; dequantized weight stored dense, in ignore"})
            continue
        codes, zeros, scales, b, g = _quant_parts(pkg, name)
        n_out, k = codes.shape
        arrays[f"{name}.weight_packed"] = pack_int32(codes.astype(np.uint8), b)
        arrays[f"{name}.weight_zero_point"] = np.ascontiguousarray(pack_int32(zeros.astype(np.uint8).T, b).T)
        arrays[f"{name}.weight_scale"] = scales.numpy().astype(sd)
        arrays[f"{name}.weight_shape"] = np.array([n_out, k], dtype=np.int64)
        groups.setdefault((b, g), []).append(name)
        layers_report.append({"layer": name, "format": f"pack-quantized W{b} g{g} asymmetric",
                              "exact": scale_dtype == "float32",
                              "note": _describe(lay) + ("; scales float32 (fp16 values): (q − zero)·scale exact in "
                                                        "float32" if scale_dtype == "float32" else
                                                        "; scales float16: (q − zero)·scale rounds to fp16")})
    config_groups = {}
    for i, ((b, g), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": _regex_targets(names, n_layers),
            "weights": {"num_bits": b, "type": "int", "symmetric": False, "strategy": "group", "group_size": g,
                        "dynamic": False, "actorder": None, "zp_dtype": "torch.int8"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
          "global_compression_ratio": None,
          # transformers: dequantize while loading (its compressed path cannot load packed zero points)
          "dequantize": True}
    cfg = {k: v for k, v in mc.items() if k not in ("_name_or_path", "transformers_version")}
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=tied, dtype="float32")
    cfg["quantization_config"] = qc
    export_meta = {"format": "compressed-tensors", **_provenance(pkg), "not_reproduced": not_reproduced(pkg.recipe),
                   "layers": layers_report}
    copied = []
    with atomic_directory(out) as tmp:
        save_file(arrays, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        gen = {k: mc[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if mc.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        with tokenizer_dir(pkg) as tdir:
            for fname in TOKENIZER_FILES if tdir else ():
                if (tdir / fname).is_file():
                    shutil.copyfile(tdir / fname, tmp / fname)
                    copied.append(fname)
        (tmp / MARKER_FILE).write_text(json.dumps(export_meta, indent=1))
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"format": "compressed-tensors", "out": str(out), "bytes": size, **_provenance(pkg),
            "quantization_config": qc, "tokenizer_files": copied,
            "exact": all(x["exact"] for x in layers_report), "layers": layers_report,
            "model_safetensors_sha256": sha256_file(out / "model.safetensors"),
            "not_reproduced": not_reproduced(pkg.recipe)}
