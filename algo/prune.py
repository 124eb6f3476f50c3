"""N:M semi-structured weight pruning (2:4 by default; 4:8 and 1:4 as options).

"N:M" keeps **N** weights out of every group of **M** consecutive weights along the *input*
dimension K of a linear layer's weight W[N_out, K] (``2:4``: 2 of every 4 columns of a row are
kept). Every ``nn.Linear`` of the model is pruned except the ``recipe.prune_skip`` patterns
(fnmatch on module names; ``lm_head`` by default — with tied embeddings it *is* the embedding).

Selection methods (``recipe.prune_method``):

* ``magnitude``: keep the N largest |W| of each group (no data).
* ``wanda``  (Sun et al. 2023): keep the N largest |W[n,k]| · ‖X[:,k]‖₂, X = the layer's inputs on
  the calibration set; no weight update.
* ``sparsegpt`` (Frantar & Alistarh 2023): Hessian H = XᵀX (+1 % damping); columns are visited left
  to right in blocks of 128; at the first column of each M-group the N kept weights of each row are
  those with the largest w²/[H⁻¹]ₖₖ², the others are zeroed and their error is compensated on
  the not-yet-visited columns through the Cholesky factor of H⁻¹ (OBS update).

Calibration is layer by layer and sequential: the inputs of decoder layer l are the outputs of
the already *pruned* layers 0..l-1 on ``calib`` (LongTensor [n, seqlen] of WikiText-2 valid).

Outputs on every pruned ``nn.Linear``: ``weight`` with exact zeros at pruned positions and
``module.accllm_mask`` (bool [N_out, K], True = kept, exactly N per group). The package exporter
encodes each group's kept set as an index into the ``C(M, N)`` patterns in lexicographic order
of kept column tuples (:func:`nm_patterns`; for 2:4: (0,1),(0,2),(0,3),(1,2),(1,3),(2,3) → 3 bits;
4:8: 70 patterns → 7 bits; 1:4: 4 patterns → 2 bits), see :func:`pattern_indices`.
"""
from __future__ import annotations

import fnmatch
import itertools
import math
import sys
import time

import torch
from torch import nn

from .common import AccllmError
from .calib import capture_layer0_inputs

SPARSEGPT_BLOCK = 128
SPARSEGPT_DAMP = 0.01
CALIB_BATCH = 8


# --------------------------------------------------------------------------------------------
# N:M masks and the pattern-index encoding
# --------------------------------------------------------------------------------------------
def check_nm(nm) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in nm)
    except (TypeError, ValueError):
        raise AccllmError(f"N:M sparsity must be a pair of integers, got {nm!r}") from None
    if not (0 < n < m):
        raise AccllmError(f"N:M sparsity needs 0 < N < M (N kept of every M), got {n}:{m}")
    return n, m


def nm_patterns(n: int, m: int) -> list[tuple[int, ...]]:
    """The C(m, n) kept-column patterns of one group, in lexicographic order (the index encoding)."""
    return list(itertools.combinations(range(m), n))


def index_bits(n: int, m: int) -> int:
    """Bits of one group's pattern index (2:4 → 3, 4:8 → 7, 1:4 → 2)."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask (True = kept) with the n largest *scores* of every group of m along the last dim.
    Ties: the lower column wins (stable sort)."""
    rows, k = scores.shape
    if k % m:
        raise AccllmError(f"N:M pruning needs the input dimension to be a multiple of M={m}, got K={k}")
    g = scores.reshape(rows, k // m, m)
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(rows, k)


def pattern_indices(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per-group pattern index (uint8 [rows, K/m]) of a keep mask with exactly n kept per group."""
    rows, k = mask.shape
    if k % m:
        raise AccllmError(f"mask width {k} is not a multiple of M={m}")
    g = mask.reshape(rows, k // m, m).to(torch.int64)
    if not bool((g.sum(-1) == n).all()):
        raise AccllmError(f"mask is not {n}:{m}: some group does not keep exactly {n} of {m}")
    # Bit code of a group (column j → bit j) → lexicographic pattern index through a lookup table.
    code = (g * (1 << torch.arange(m))).sum(-1)
    lut = torch.full((1 << m,), -1, dtype=torch.int64)
    for i, pat in enumerate(nm_patterns(n, m)):
        lut[sum(1 << c for c in pat)] = i
    idx = lut[code]
    return idx.to(torch.uint8 if math.comb(m, n) <= 256 else torch.int16)


def mask_from_pattern_indices(idx: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pattern_indices`: bool keep mask [rows, K]."""
    pats = torch.zeros(math.comb(m, n), m, dtype=torch.bool)
    for i, pat in enumerate(nm_patterns(n, m)):
        pats[i, list(pat)] = True
    idx = idx.to(torch.int64)
    if idx.numel() and (idx.min() < 0 or idx.max() >= len(pats)):
        raise AccllmError(f"pattern index out of range for {n}:{m} (0..{len(pats) - 1})")
    return pats[idx].reshape(idx.shape[0], -1)


# --------------------------------------------------------------------------------------------
# per-layer selection
# --------------------------------------------------------------------------------------------
def _magnitude(w: torch.Tensor, n: int, m: int, H=None) -> tuple[torch.Tensor, torch.Tensor]:
    mask = nm_mask(w.abs(), n, m)
    return w * mask, mask


def _wanda(w: torch.Tensor, n: int, m: int, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = torch.diagonal(H).clamp_min(0).sqrt()          # ‖X[:, k]‖₂ (up to a common factor)
    mask = nm_mask(w.abs() * norms[None, :], n, m)
    return w * mask, mask


def _sparsegpt(w: torch.Tensor, n: int, m: int, H: torch.Tensor,
               blocksize: int = SPARSEGPT_BLOCK, percdamp: float = SPARSEGPT_DAMP):
    W = w.clone().double()
    H = H.clone().double()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diagonal(H))
    H += damp * torch.eye(cols, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # not positive definite even after damping
        raise AccllmError(f"SparseGPT: the calibration Hessian is not positive definite ({e}); use more "
                          f"calib_samples or prune_method=wanda") from None
    if blocksize % m:
        blocksize = m * max(1, blocksize // m)
    mask = torch.zeros_like(W, dtype=torch.bool)   # True = pruned (during the sweep)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w_col = W1[:, i]
            d = Hinv1[i, i]
            if i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / (torch.diagonal(Hinv1)[i:i + m].reshape(1, -1)) ** 2
                # prune the (m - n) smallest; ties: the higher column is pruned (lower column kept)
                keep = torch.sort(tmp, dim=1, descending=True, stable=True).indices[:, :n]
                pruned = torch.ones_like(tmp, dtype=torch.bool)
                pruned.scatter_(1, keep, False)
                mask1[:, i:i + m] = pruned
            q = w_col.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w_col - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    keep = ~mask
    return (W * keep).to(w.dtype), keep


def _sparsegpt_single_thread(w, n, m, H):
    # The column sweep is thousands of small ops: one thread is ~15x faster than two on a shared
    # 2-core machine (thread hand-off dominates); the big Hessian products stay multi-threaded.
    if w.device.type != "cpu":
        return _sparsegpt(w, n, m, H)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sparsegpt(w, n, m, H)
    finally:
        torch.set_num_threads(before)


METHODS = {"magnitude": _magnitude, "wanda": _wanda, "sparsegpt": _sparsegpt_single_thread}


def _rel_err(w: torch.Tensor, w_new: torch.Tensor, H: torch.Tensor | None) -> float | None:
    if H is None:
        return None
    d = (w - w_new).double()
    Hd = H.double()
    num = ((d @ Hd) * d).sum()
    den = ((w.double() @ Hd) * w.double()).sum()
    return float(num / den) if den > 0 else None


# --------------------------------------------------------------------------------------------
# model-level driver
# --------------------------------------------------------------------------------------------
def prune_targets(model, skip_patterns) -> dict[str, nn.Linear]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in skip_patterns):
            out[name] = mod
    return out


def _decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise AccllmError("pruning needs a Llama-family causal LM (model.model.layers); got "
                          f"{type(model).__name__}")
    return inner, layers


def _run_layer(layer, batches):
    outs = []
    for h, kw in batches:
        o = layer(h, **kw)
        outs.append(o[0] if isinstance(o, tuple) else o)
    return outs


@torch.no_grad()
def prune_model(model, recipe, calib=None, progress: bool = True, tune_block=None) -> dict:
    """Prune *model* in place to ``recipe.nm``; set ``accllm_mask`` on every pruned Linear.

    Returns a report: method, sparsity, per-layer {shape, kept fraction, relative output error
    tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on the calibration inputs (None for magnitude without data)}, totals.
    The work is done block by block by a :class:`LayerPruner` (the block-streamed build drives one
    the same way, one decoder block at a time).
    """
    pruner = LayerPruner(model, recipe, calib, progress=progress, tune_block=tune_block)
    pruner.start()
    for li in pruner.bar(range(len(pruner.layers))):
        pruner.layer(li)
    return pruner.finish()


class LayerPruner:
    """N:M pruning of one model, one decoder block at a time: :meth:`start` (checks, the calibration
    inputs of block 0), :meth:`layer` for blocks 0, 1, … in order (each pruned on the outputs of the
    already pruned blocks before it), :meth:`finish` (lm_head if pruned, the report). Its state between
    blocks (:meth:`state` / :meth:`set_state`) is the calibration stream and the per-layer reports."""

    def __init__(self, model, recipe, calib=None, progress: bool = True, tune_block=None):
        if not recipe.nm:
            raise AccllmError("prune_model: the recipe has no N:M sparsity (sparsity=none)")
        self.n, self.m = n, m = check_nm(recipe.nm)
        method = recipe.prune_method
        if method not in METHODS:
            raise AccllmError(f"prune_method {method!r} is not accepted; choose one of {', '.join(METHODS)}")
        self.model, self.recipe, self.progress, self.tune_block, self.method = model, recipe, progress, tune_block, method
        targets = prune_targets(model, recipe.prune_skip)
        if not targets:
            raise AccllmError(f"no linear layer left to prune: prune_skip {recipe.prune_skip} matches all of them")
        for name, mod in targets.items():
            if mod.in_features % m:
                raise AccllmError(f"layer {name}: input dimension {mod.in_features} is not a multiple of M={m} "
                                  f"for {n}:{m} pruning; add it to prune_skip")
        self.inner, self.layers = inner, layers = _decoder_layers(model)
        layer_prefix = {}
        for li, layer in enumerate(layers):
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear):
                    layer_prefix[id(mod)] = li
        self.outside = outside = [name for name, mod in targets.items() if id(mod) not in layer_prefix]
        for name in outside:
            if name != "lm_head":
                raise AccllmError(f"layer {name} lies outside the decoder layers; only lm_head can be pruned "
                                  f"there — add {name} to prune_skip")
            emb = inner.embed_tokens.weight
            if targets[name].weight is emb or targets[name].weight.data_ptr() == emb.data_ptr() != 0:
                raise AccllmError("lm_head is tied to the embedding table (tie_word_embeddings); pruning it would "
                                  "prune the embeddings too — keep 'lm_head' in prune_skip")
        self.targets = {name: targets[name] for name in outside}     # the block linears are looked up per block
        # decoder-block linears by block index, by name (block-local names with the model prefix)
        self.by_layer: dict[int, list[str]] = {}
        for name, mod in targets.items():
            if id(mod) in layer_prefix:
                self.by_layer.setdefault(layer_prefix[id(mod)], []).append(name)
        needs_data = method != "magnitude"
        if calib is None and recipe.block_tune_steps > 0 and not recipe.weight_bits:
            raise AccllmError(f"block_tune_steps={recipe.block_tune_steps} needs calibration windows (WikiText-2 valid); "
                              f"pass calib, or set block_tune_steps=0")
        if needs_data and calib is None:
            raise AccllmError(f"prune_method={method} needs calibration data (WikiText-2 valid windows)")
        if calib is not None and (calib.dim() != 2 or calib.dtype != torch.long):
            raise AccllmError(f"calibration data must be a LongTensor [n, seqlen], got {tuple(calib.shape)} {calib.dtype}")
        self.calib = calib
        # block-wise reconstruction of the kept weights (quant/blocktune.py) when pruning is the last
        # step that changes weights (with weight quantization, the quantizer tunes the blocks instead)
        self.tune = calib is not None and recipe.block_tune_steps > 0 and not recipe.weight_bits
        if self.tune and tune_block is None:
            raise AccllmError("block_tune_steps > 0 without weight quantization needs the block-wise reconstruction "
                              "(tune_block=quant.blocktune.tune_block, as quant.pipeline passes it)")
        self.per_layer: dict[str, dict] = {}
        self.tuned: dict[str, dict] = {}
        self.batches = self.fp_batches = None
        self.t0 = time.time()
        self._bar = None

    def bar(self, it):
        from tqdm.auto import tqdm
        n, m = self.n, self.m
        desc = f"prune {n}:{m} {self.method}"
        if self.calib is None:
            return it
        self._bar = tqdm(it, desc=desc, unit="layer", disable=not self.progress)
        return self._bar

    def start(self) -> None:
        """The calibration inputs of decoder block 0 (and, without data, nothing)."""
        self.t0 = time.time()
        if self.calib is None:
            return
        device = self.inner.embed_tokens.weight.device
        self.calib = self.calib.to(device)
        self.batches = capture_layer0_inputs(self.model, self.calib, CALIB_BATCH)
        self.fp_batches = list(self.batches) if self.tune else None

    def state(self) -> dict:
        return {"batches": self.batches, "fp_batches": self.fp_batches, "per_layer": self.per_layer,
                "tuned": self.tuned, "elapsed": time.time() - self.t0}

    def set_state(self, st: dict) -> None:
        self.batches, self.fp_batches = st["batches"], st["fp_batches"]
        self.per_layer, self.tuned = st["per_layer"], st["tuned"]
        self.t0 = time.time() - st["elapsed"]

    def _prune_one(self, name, mod, H):
        t = time.time()
        w = mod.weight.data.float()
        w_new, mask = METHODS[self.method](w, self.n, self.m, H)
        w_new = w_new * mask
        self.per_layer[name] = {"shape": list(w.shape), "kept": float(mask.float().mean()),
                                "rel_err": _rel_err(w, w_new, H), "seconds": round(time.time() - t, 3)}
        mod.weight.data.copy_(w_new.to(mod.weight.dtype))
        mod.accllm_mask = mask.to(mod.weight.device)

    @torch.no_grad()
    def layer(self, li: int) -> None:
        """Prune decoder block *li* (blocks before it are done) and move the calibration stream past it."""
        layer = self.layers[li]
        mods = {name: self.model.get_submodule(name) for name in self.by_layer.get(li, [])}
        if self.calib is None:
            for name, mod in mods.items():
                self._prune_one(name, mod, None)
            return
        recipe, tune, batches = self.recipe, self.tune, self.batches
        device = self.calib.device
        block_targets = _run_layer(layer, self.fp_batches) if tune else None   # the dense block, dense stream
        Hs = {name: torch.zeros(mod.in_features, mod.in_features, dtype=torch.float32, device=device)
              for name, mod in mods.items()}
        counts = {name: 0 for name in mods}
        alias: dict[str, str] = {}      # q/k/v (and gate/up) read the same input: one Hessian
        seen: dict = {}
        handles = []
        for name, mod in mods.items():
            def hook(_m, inp, _out, name=name):
                x = inp[0]
                key = (x.data_ptr(), tuple(x.shape))
                first = seen.setdefault(key, (name, x))[0]   # holding x: its memory is not reused
                if first != name:
                    alias[name] = first
                    return
                x = x.reshape(-1, x.shape[-1]).float()
                Hs[name].addmm_(x.T, x)
                counts[name] += x.shape[0]
            handles.append(mod.register_forward_hook(hook))
        try:
            if mods:
                for h, kw in batches:
                    seen.clear()
                    layer(h, **kw)
        finally:
            for h in handles:
                h.remove()
        seen.clear()
        for name, mod in mods.items():
            src = alias.get(name, name)
            self._prune_one(name, mod, Hs[src] / max(1, counts[src]))
        del Hs
        if tune and mods:
            self.tuned[f"model.layers.{li}"] = self.tune_block(
                layer, [h for h, _ in batches], [kw for _, kw in batches], block_targets, recipe.block_tune_steps,
                recipe.block_tune_lr, seed=recipe.seed + li, tokens=recipe.block_tune_tokens)
        if tune:
            self.fp_batches = [(o, kw) for o, (_, kw) in zip(block_targets, self.fp_batches)]
        outs = _run_layer(layer, batches)
        self.batches = [(o, kw) for o, (_, kw) in zip(outs, batches)]
        if self._bar is not None:
            self._bar.set_postfix(err=f"{sum(self.per_layer[k]['rel_err'] or 0 for k in mods) / max(1, len(mods)):.3f}")

    @torch.no_grad()
    def finish(self) -> dict:
        """lm_head (when pruned: on the final norm of the pruned stack) and the report."""
        n, m, method, calib, per_layer = self.n, self.m, self.method, self.calib, self.per_layer
        for name in self.outside:       # lm_head (untied): inputs are the final norm of the pruned stack
            mod = self.targets[name]
            if calib is None:
                self._prune_one(name, mod, None)
                continue
            H = torch.zeros(mod.in_features, mod.in_features, dtype=torch.float32, device=calib.device)
            cnt = 0
            for h, _ in self.batches:
                x = self.inner.norm(h).reshape(-1, h.shape[-1]).float()
                H.addmm_(x.T, x)
                cnt += x.shape[0]
            self._prune_one(name, mod, (H / max(1, cnt)).float())
        self.batches = self.fp_batches = None
        t0, tuned, progress = self.t0, self.tuned, self.progress

        total = sum(p["shape"][0] * p["shape"][1] for p in per_layer.values())
        kept = sum(p["kept"] * p["shape"][0] * p["shape"][1] for p in per_layer.values())
        errs = [p["rel_err"] for p in per_layer.values() if p["rel_err"] is not None]
        report = {"method": method, "sparsity": f"{n}:{m}", "index_bits_per_group": index_bits(n, m),
                  "layers_pruned": len(per_layer), "weights_in_pruned_layers": total,
                  "kept_fraction": kept / total if total else 1.0,
                  "mean_rel_err": sum(errs) / len(errs) if errs else None,
                  "calib": list(calib.shape) if calib is not None else None,
                  "seconds": round(time.time() - t0, 2), "layers": per_layer}
        if tuned:
            report["block_tune"] = tuned
        if progress:
            worst = sorted(((p["rel_err"] or 0, k) for k, p in per_layer.items()), reverse=True)[:3]
            print(f"pruned {len(per_layer)} linear layers to {n}:{m} ({method}) in {report['seconds']:.1f} s; "
                  f"kept {report['kept_fraction']:.3f} of their weights"
                  + (f"; mean rel. output error {report['mean_rel_err']:.4f}, worst "
                     + ", ".join(f"{k} {e:.4f}" for e, k in worst) if errs else ""), file=sys.stderr)
        return report
