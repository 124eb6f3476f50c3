"""The compressed model package: ``manifest.json`` + ``weights.safetensors`` (see
docs/numerics.md, "Quantization formats", for every tensor's layout).

Writing: :func:`package_tensors` turns a prepared (quantized) torch model into the packed tensors
and the manifest's ``tensors``/``layers``/``footprint``; :func:`write_package_files` writes them into
a directory (the build flow wraps it in ``algo.common.atomic_directory``); :func:`add_files` lets a
later stage (the hw compiler) add files and their sha256 to an existing package atomically.

Reading: :func:`load_package` verifies ``format``, ``format_version``, the manifest's own digest
(``manifest_sha256``: sha256 of the canonical JSON of every other field, so an edit of manifest.json is
refused like a tampered weight file), the types and ranges of the fields the tools read, and the sha256
of every file (a missing, truncated or tampered file is refused naming it), and returns a :class:`Package`.
Manifests are written only through :func:`manifest_text` / :func:`write_manifest`, which set the digest.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from algo.common import AccllmError, atomic_write_bytes, atomic_write_text, sha256_file

from .pack import decode_24, encode_24, pack_bits, packed_nbytes, unpack_bits
from .qlinear import QLinear

FORMAT = "accllm-package"
FORMAT_VERSION = 2              # 2: manifest_sha256 covers the manifest itself
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
DIGEST_KEY = "manifest_sha256"


def manifest_digest(man: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of every field but the digest itself."""
    body = {k: v for k, v in man.items() if k != DIGEST_KEY}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as e:
        raise AccllmError(f"{MANIFEST}: a value is not finite ({e})") from None
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_text(man: dict) -> str:
    """The text of manifest.json for *man*, with its digest set (also in *man*)."""
    man[DIGEST_KEY] = manifest_digest(man)
    return json.dumps(man, indent=1)


def write_manifest(directory: str | os.PathLike, man: dict) -> None:
    """Write *directory*/manifest.json atomically, with its digest."""
    atomic_write_text(Path(directory) / MANIFEST, manifest_text(man))


def save_weights(tensors: dict, path: str | os.PathLike) -> None:
    """weights.safetensors, byte-reproducible: its metadata is one key, because safetensors writes a
    metadata map in an order that changes from one process to the next."""
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata={"format": f"{FORMAT} {FORMAT_VERSION}"})


def tool_version() -> str:
    try:
        from importlib.metadata import version
        return version("accllm")
    except Exception:
        return "unknown"


def _is_24(mask: torch.Tensor | None) -> bool:
    if mask is None or mask.shape[1] % 4:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def package_tensors(model, kv_hook=None) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """Pack *model* (LlamaForCausalLM whose linears are QLinear or nn.Linear). Returns
    (tensors, tensor_meta, layers, footprint)."""
    packer = Packer(bool(getattr(model.config, "tie_word_embeddings", False)))
    for name, p in model.named_parameters():
        packer.add_float(name, p)
    for name, m in model.named_modules():
        packer.add_linear(name, m)
    if kv_hook is not None:
        packer.add_kv(kv_hook.constants())
    return packer.result()


class Packer:
    """The packed tensors of a model, added a piece at a time (a whole model by :func:`package_tensors`,
    or one decoder block after another by the block-streamed build): the embedding and norms
    (:meth:`add_float`), each linear layer (:meth:`add_linear`), the KV constants (:meth:`add_kv`);
    :meth:`result` lists them in the order of a whole-model pack (float tensors, linear layers, KV
    constants) with the footprint over all of them."""

    def __init__(self, tied: bool):
        self.tied = tied
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: dict[str, dict[str, dict]] = {"float": {}, "linear": {}, "kv": {}}
        self.layers: dict[str, dict] = {}
        self.counts = {"fp_params": 0, "lin_bytes": 0, "lin_params": 0, "blk_bytes": 0, "blk_params": 0}

    def _put(self, part, name, t, kind, bits=None, logical_shape=None):
        self.tensors[name] = t.contiguous()
        self.meta[part][name] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "bits": bits,
                                 "logical_shape": list(logical_shape if logical_shape is not None else t.shape),
                                 "kind": kind}

    def add_float(self, name: str, p) -> None:
        """A parameter of the model: stored (fp16) if it is the embedding table or a norm weight."""
        if name.endswith("embed_tokens.weight") or name.endswith("norm.weight"):
            self._put("float", name, p.detach().to(torch.float16), "embedding" if "embed" in name else "norm", 16)
            self.counts["fp_params"] += p.numel()

    def add_kv(self, constants: dict) -> None:
        for name, t in constants.items():
            self._put("kv", name, t, "kv_const", 16)

    def add_linear(self, name: str, m) -> None:
        """Module *name* of the model, if it is a linear layer (QLinear or nn.Linear)."""
        if not isinstance(m, (QLinear, nn.Linear)):
            return
        put = lambda *a, **k: self._put("linear", *a, **k)      # noqa: E731
        tensors, layers, tied, c = self.tensors, self.layers, self.tied, self.counts
        n_out, k = m.out_features, m.in_features
        entry = {"in_features": k, "out_features": n_out, "tensors": []}
        nbytes = 0
        if isinstance(m, QLinear) and m.bits:
            b, g = m.bits, m.group
            entry.update(bits=b, group=g, sparsity="none")
            codes = m.codes.numpy()
            mask = None if m.mask is None else m.mask.numpy()
            if mask is not None and _is_24(m.mask):
                kept, idx = encode_24(codes, mask)
                put(f"{name}.qweight", _t(pack_bits(kept, b)), "qweight", b, [n_out, k // 2])
                put(f"{name}.sparse_idx", _t(pack_bits(idx, 3)), "sparse_idx", 3, [n_out, k // 4])
                entry["sparsity"] = "2:4"
                entry["tensors"] += [f"{name}.qweight", f"{name}.sparse_idx"]
            else:
                put(f"{name}.qweight", _t(pack_bits(codes, b)), "qweight", b, [n_out, k])
                entry["tensors"].append(f"{name}.qweight")
                if mask is not None:        # N:M other than 2:4: dense codes + a 1-bit keep mask
                    put(f"{name}.mask", _t(pack_bits(mask.astype(np.uint8), 1)), "mask", 1, [n_out, k])
                    entry["sparsity"] = "mask"
                    entry["tensors"].append(f"{name}.mask")
            put(f"{name}.zeros", _t(pack_bits(m.zeros.numpy(), b)), "zeros", b, [n_out, k // g])
            put(f"{name}.scales", m.scales.to(torch.float16), "scales", 16)
            entry["tensors"] += [f"{name}.zeros", f"{name}.scales"]
        else:
            if name == "lm_head" and tied:
                entry.update(bits=0, tied_to="model.embed_tokens.weight")
                layers[name] = entry
                return
            w = m.weight.detach().to(torch.float16)
            put(f"{name}.weight", w, "weight", 16)
            entry.update(bits=0, group=None, sparsity="none")
            entry["tensors"].append(f"{name}.weight")
            if isinstance(m, QLinear) and m.mask is not None:
                put(f"{name}.mask", _t(pack_bits(m.mask.numpy().astype(np.uint8), 1)), "mask", 1, [n_out, k])
                entry["tensors"].append(f"{name}.mask")
        bias = getattr(m, "bias", None)
        if bias is not None:         # fp16, added in float by the fake-quant model (Q16.16 on the accelerator)
            put(f"{name}.bias", bias.detach().to(torch.float16), "bias", 16)
            entry["bias"] = f"{name}.bias"
            entry["tensors"].append(f"{name}.bias")
        if isinstance(m, QLinear) and m.act_bits:
            entry.update(act_bits=m.act_bits, act_scheme=m.act_scheme)
            if m.act_scheme == "per_tensor":
                put(f"{name}.act_scale", m.act_scale.reshape(1).to(torch.float16), "act_scale", 16)
                entry["tensors"].append(f"{name}.act_scale")
        nbytes = sum(tensors[t].numel() * tensors[t].element_size() for t in entry["tensors"])
        entry["bytes"] = nbytes
        entry["bits_per_weight"] = round(8 * nbytes / (n_out * k), 4)
        layers[name] = entry
        c["lin_bytes"] += nbytes
        c["lin_params"] += n_out * k
        if name != "lm_head":
            c["blk_bytes"] += nbytes
            c["blk_params"] += n_out * k

    def result(self) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
        meta = {**self.meta["float"], **self.meta["linear"], **self.meta["kv"]}
        tensors = {n: self.tensors[n] for n in meta}
        c = self.counts
        fp_params, lin_bytes, lin_params, blk_bytes, blk_params = (
            c["fp_params"], c["lin_bytes"], c["lin_params"], c["blk_bytes"], c["blk_params"])
        layers = self.layers
        total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        # QLinear keeps W_hat in a buffer, not a parameter: count logical weights explicitly.
        total_params = fp_params + lin_params
        footprint = {
            "bits_per_weight_blocks": round(8 * blk_bytes / max(blk_params, 1), 4),
            "bits_per_weight_linear": round(8 * lin_bytes / max(lin_params, 1), 4),
            "bits_per_weight_total": round(8 * total_bytes / max(total_params, 1), 4),
            "bytes_linear": lin_bytes, "bytes_total_tensors": total_bytes,
            "params_linear": lin_params, "params_total": total_params,
            "note": "every overhead counted: codes, zero points, fp16 scales, 2:4 indices, masks, act scales; "
                    "blocks = linear layers of the decoder blocks, linear = blocks + lm_head, total = every "
                    "stored tensor over every model weight (embedding and norms included)",
        }
        return tensors, meta, layers, footprint


def write_package_files(directory: str | os.PathLike, tensors: dict, manifest: dict) -> None:
    """Write weights.safetensors and manifest.json (with ``files`` sha256) into *directory*."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, d / WEIGHTS)
    files = dict(manifest.get("files") or {})
    files[WEIGHTS] = sha256_file(d / WEIGHTS)
    manifest["files"] = files
    write_manifest(d, manifest)


def add_files(directory: str | os.PathLike, files: dict[str, bytes], manifest_updates: dict | None = None) -> None:
    """For later stages: write *files* into an existing package and record their sha256 (and any
    *manifest_updates*, e.g. ``{"hw": ...}``) in manifest.json. Each write is atomic."""
    d = Path(directory)
    man = json.loads((d / MANIFEST).read_text())
    for fname, data in files.items():
        if "/" in fname or fname in (MANIFEST,):
            raise AccllmError(f"cannot add {fname!r} to a package (plain file names only, not {MANIFEST})")
        atomic_write_bytes(d / fname, data)
        man.setdefault("files", {})[fname] = sha256_file(d / fname)
    man.update(manifest_updates or {})
    write_manifest(d, man)


class Package:
    """A verified package directory."""

    def __init__(self, directory: Path, manifest: dict):
        self.dir = directory
        self.manifest = manifest
        self._tensors = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            from safetensors.torch import load_file
            try:
                self._tensors = load_file(str(self.dir / WEIGHTS))
            except Exception as e:
                raise AccllmError(f"package {self.dir}: {WEIGHTS} cannot be read ({e})") from None
            for name, m in self.manifest.get("tensors", {}).items():
                t = self._tensors.get(name)
                if t is None or list(t.shape) != m["shape"]:
                    raise AccllmError(f"package {self.dir}: tensor {name} in manifest.json is missing or has "
                                      f"another shape in {WEIGHTS}")
        return self._tensors

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor; read on its own from the memory-mapped file (opened and closed again) unless all of
        them were read, so a reader that goes through the tensors one by one (the hw compiler) never holds
        a 7B model's weights twice."""
        if self._tensors is not None:
            if name not in self._tensors:
                raise AccllmError(f"package {self.dir}: no tensor {name!r}")
            return self._tensors[name]
        from safetensors import safe_open
        try:
            with safe_open(str(self.dir / WEIGHTS), framework="pt") as f:
                t = f.get_tensor(name) if name in f.keys() else None
        except Exception as e:
            raise AccllmError(f"package {self.dir}: {WEIGHTS} cannot be read ({e})") from None
        m = self.manifest.get("tensors", {}).get(name)
        if t is None:
            raise AccllmError(f"package {self.dir}: no tensor {name!r}")
        if m is not None and list(t.shape) != m["shape"]:
            raise AccllmError(f"package {self.dir}: tensor {name} in manifest.json is missing or has "
                              f"another shape in {WEIGHTS}")
        return t

    @property
    def recipe(self):
        from algo.recipe import recipe_from_dict
        return recipe_from_dict(self.manifest["recipe"])

    def linear(self, name: str):
        """(codes [N,K] int64, zeros [N,K/g] int64, scales [N,K/g] fp16, mask [N,K] bool | None, bits,
        group) of a quantized linear layer; pruned positions have code == zero point."""
        lay = self.manifest["layers"].get(name)
        if lay is None:
            raise AccllmError(f"package {self.dir}: no linear layer {name!r}")
        b, g = lay.get("bits"), lay.get("group")
        if not b:
            raise AccllmError(f"package {self.dir}: layer {name} is stored in float (bits 0), not quantized")
        n, k = lay["out_features"], lay["in_features"]
        zeros = unpack_bits(self.tensor(f"{name}.zeros"), b, n * (k // g)).reshape(n, k // g).astype(np.int64)
        scales = self.tensor(f"{name}.scales")
        mask = None
        if lay["sparsity"] == "2:4":
            kept = unpack_bits(self.tensor(f"{name}.qweight"), b, n * k // 2).reshape(n, k // 2)
            idx = unpack_bits(self.tensor(f"{name}.sparse_idx"), 3, n * k // 4).reshape(n, k // 4)
            fill = np.repeat(zeros, g, axis=1)
            codes, mask = decode_24(kept.astype(np.int64), idx, k, fill)
        else:
            codes = unpack_bits(self.tensor(f"{name}.qweight"), b, n * k).reshape(n, k).astype(np.int64)
            if lay["sparsity"] == "mask":
                mask = unpack_bits(self.tensor(f"{name}.mask"), 1, n * k).reshape(n, k).astype(bool)
        return (torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(zeros), scales,
                None if mask is None else torch.from_numpy(mask), b, g)

    def kv_hook(self):
        r = self.recipe
        if not r.kv_bits:
            return None
        from .kv import KVQuantHook
        L = self.manifest["model_config"]["num_hidden_layers"]
        return KVQuantHook.from_constants(r.kv_bits, r.kv_group_size, L, self.tensors, r.kv_key_rope,
                                         r.kv_key_token_scale)

    def to_torch_model(self):
        """The fake-quant torch model this package describes (QLinear layers built from the packed
        integers; float tensors from their fp16 copies; SpAtten installed when the recipe prunes)."""
        model = model_for_config(self.manifest["model_config"], f"package {self.dir}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("embed_tokens.weight") or name.endswith("norm.weight"):
                    p.copy_(self.tensor(name).float())
        for name, lay in self.manifest["layers"].items():
            lin = model.get_submodule(name)
            if lay.get("tied_to"):
                continue
            act = dict(act_bits=lay.get("act_bits", 0), act_scheme=lay.get("act_scheme", "per_token"))
            if lay.get("bias"):
                act["bias"] = self.tensor(lay["bias"]).float()
            elif getattr(lin, "bias", None) is not None:
                raise AccllmError(f"package {self.dir}: layer {name} has no bias tensor but its model has a bias")
            if lay.get("bits"):
                codes, zeros, scales, mask, b, g = self.linear(name)
                q = QLinear(lin.in_features, lin.out_features, bits=b, group=g, codes=codes, zeros=zeros,
                            scales=scales, mask=mask, **act)
            else:
                mask = None
                if f"{name}.mask" in self.tensors:
                    n, k = lay["out_features"], lay["in_features"]
                    mask = torch.from_numpy(unpack_bits(self.tensor(f"{name}.mask"), 1, n * k).reshape(n, k).astype(bool))
                q = QLinear(lin.in_features, lin.out_features, bits=0, group=0,
                            float_weight=self.tensor(f"{name}.weight").float(), mask=mask, **act)
            if act["act_bits"] and act["act_scheme"] == "per_tensor":
                q.act_scale = self.tensor(f"{name}.act_scale").float().reshape(())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, q)
        if self.manifest["layers"].get("lm_head", {}).get("tied_to"):
            model.lm_head.weight = model.model.embed_tokens.weight
        from algo.recipe import _ratio_active
        r = self.recipe
        if _ratio_active(r.token_keep) or _ratio_active(r.head_keep):
            from algo.spatten import install          # SpAtten is part of the recipe's attention
            install(model, r)
        return model

    def cache_factory(self, model):
        hook = self.kv_hook()
        r = self.recipe
        if hook is None and r.attention == "full":
            return None
        from algo.attention import make_cache_factory
        return make_cache_factory(model, r, hook)


def model_for_config(model_config: dict, where: str):
    """A float32 model (eval mode, random weights) of the family in *model_config* (a config's to_dict:
    LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM, algo.models.check_model_config)."""
    import transformers
    from algo.models import check_model_config
    arch = check_model_config(model_config, where)
    cls = getattr(transformers, arch)
    cfg = cls.config_class.from_dict(dict(model_config))
    return cls(cfg).to(torch.float32).eval()


def read_manifest(directory: str | os.PathLike) -> dict:
    """The package's manifest after the cheap checks (directory, JSON, format, format_version); the
    sha256 of the files is checked by :func:`load_package`."""
    d = Path(directory)
    mf = d / MANIFEST
    if not d.is_dir():
        raise AccllmError(f"package {d} not found (a directory written by compile-model is expected)")
    if not mf.is_file():
        raise AccllmError(f"package {d}: {MANIFEST} is missing; not an accllm package")
    try:
        man = json.loads(mf.read_text())
    except ValueError as e:
        raise AccllmError(f"package {d}: {MANIFEST} is not valid JSON ({e}); tampered or truncated") from None
    if not isinstance(man, dict):
        raise AccllmError(f"package {d}: {MANIFEST} is not a JSON object; tampered or truncated")
    if man.get("format") != FORMAT:
        raise AccllmError(f"package {d}: {MANIFEST} format is {man.get('format')!r}, expected {FORMAT!r}")
    fv = man.get("format_version")
    if isinstance(fv, bool) or fv != FORMAT_VERSION:
        raise AccllmError(f"package {d}: {MANIFEST} format_version {fv!r} is not supported; this accllm reads "
                          f"format_version {FORMAT_VERSION} (recompile the package with compile-model)")
    digest = man.get(DIGEST_KEY)
    try:
        ok = digest == manifest_digest(man)
    except AccllmError:
        ok = False
    if not ok:
        raise AccllmError(f"package {d}: {MANIFEST} was changed after it was written ({DIGEST_KEY} "
                          f"{'is missing' if digest is None else 'does not match its content'}); restore it or "
                          f"recompile the package")
    check_manifest_schema(man, where=f"package {d}: {MANIFEST}")
    return man


# (section, key) -> (type, low, high); checked whenever the section is present
_SCHEMA = {
    ("model_config", "hidden_size"): (int, 1, 1 << 20), ("model_config", "intermediate_size"): (int, 1, 1 << 22),
    ("model_config", "num_hidden_layers"): (int, 1, 4096), ("model_config", "num_attention_heads"): (int, 1, 4096),
    ("model_config", "num_key_value_heads"): (int, 1, 4096), ("model_config", "vocab_size"): (int, 1, 1 << 24),
    ("model_config", "max_position_embeddings"): (int, 1, 1 << 30),
    ("model_config", "rms_norm_eps"): (float, 1e-12, 1e-2), ("model_config", "rope_theta"): (float, 1.0, 1e12),
}


def check_manifest_schema(man: dict, where: str = MANIFEST) -> None:
    """Types, ranges and consistency of the manifest fields the tools read."""
    for key, kind in (("recipe", dict), ("model_config", dict), ("tensors", dict), ("layers", (dict, list)),
                      ("files", dict), ("hw", dict), ("source", dict)):
        if key in man and not isinstance(man[key], kind):
            raise AccllmError(f"{where}: {key!r} must be a JSON object, got {type(man[key]).__name__}")
    for (sec, key), (kind, lo, hi) in _SCHEMA.items():
        if sec not in man or key not in man[sec] or man[sec][key] is None:
            continue
        v = man[sec][key]
        good = not isinstance(v, bool) and (isinstance(v, int) if kind is int else
                                            isinstance(v, (int, float)) and math.isfinite(v))
        if not good or not lo <= v <= hi:
            raise AccllmError(f"{where}: {sec}.{key} = {v!r} is not accepted ({kind.__name__} in [{lo:g}, {hi:g}])")
    mc = man.get("model_config", {})
    if mc.get("hidden_size") and mc.get("num_attention_heads") and mc["hidden_size"] % mc["num_attention_heads"]:
        raise AccllmError(f"{where}: model_config.hidden_size {mc['hidden_size']} is not a multiple of "
                          f"num_attention_heads {mc['num_attention_heads']}")
    for fname, digest in man.get("files", {}).items():
        if not isinstance(fname, str) or "/" in fname or not isinstance(digest, str) or len(digest) != 64:
            raise AccllmError(f"{where}: files entry {fname!r} must map a plain file name to a sha256 hex digest")
    if "recipe" in man:
        from algo.recipe import recipe_from_dict
        try:
            recipe_from_dict(man["recipe"])
        except AccllmError as e:
            raise AccllmError(f"{where}: {e}") from None


def load_package(directory: str | os.PathLike) -> Package:
    d = Path(directory)
    man = read_manifest(d)
    files = man.get("files") or {}
    if WEIGHTS not in files:
        raise AccllmError(f"package {d}: {MANIFEST} lists no {WEIGHTS}")
    for fname, digest in files.items():
        p = d / fname
        if not p.is_file():
            raise AccllmError(f"package {d}: file {fname} listed in {MANIFEST} is missing")
        if sha256_file(p) != digest:
            raise AccllmError(f"package {d}: file {fname} fails its sha256 check (tampered or truncated); "
                              f"recompile the package")
    for key in ("recipe", "model_config", "tensors", "layers"):
        if key not in man:
            raise AccllmError(f"package {d}: {MANIFEST} has no {key!r} section")
    return Package(d, man)
