"""SpAtten cascade token and head pruning (Wang et al., HPCA 2021), for causal LMs with a KV cache.

Recipe keys: ``token_keep`` and ``head_keep`` (a ratio in (0, 1], or a list with one per layer),
``spatten_start_layer`` (layers before it are never pruned), ``sink_tokens`` (always kept) and
``window`` when Λ-shaped attention is on.

Semantics (what the functional model of the accelerator reproduces):

* **Token importance** of a cached token t at layer l: the attention probability t receives,
  summed over (unpruned) query heads and over all queries that saw it, accumulated across layers
  (importance at layer l = Σ_{l' ≤ l} of the per-layer sums) and across decode steps / blocks.
* **Token selection** happens after every forward (a prefill block or one decode step), layer by
  layer from ``spatten_start_layer``: candidates are the stored tokens that are neither sinks
  (position < S) nor among the R most recent tokens (R = ``spatten_recent``, at most ``window``
  under Λ); layer l keeps ``(ceil(token_keep[l] × 2^16) × #candidates) >> 16`` of them, the top-k by
  importance among those still alive at layer l (:mod:`algo.topk`: quick-select, ties → lower
  position). A token dropped at layer l is never read again by layers ≥ l (cascade), at any later
  step. So each query reads: sinks + the top-k important older tokens + the recent tokens. Under Λ
  the candidates are the older part of Λ's window (evicted tokens are gone), so SpAtten only
  *thins* the KV reads inside Λ's bounded cache.
* **Head importance**: L2 norm of each head's attention output, summed over queries, accumulated
  across layers (cascade by head index, as in SpAtten) and steps; layer l keeps
  ``max(1, (ceil(head_keep[l] × 2^16) × H) >> 16)`` heads (top-k, ties → lower head). A pruned head's output is 0
  and its KV is not read; a KV head (GQA) is skipped only once all its query heads are pruned.
* Decisions use only what earlier forwards saw (no peeking at the current block), so a forward
  over one whole chunk (``accllm eval`` chunks mode) prunes nothing; SpAtten is measured in
  stream mode with small blocks (README).

Reported (``accllm eval --stream`` JSON key ``kv``): ``kv_reads_saved`` — the fraction of
KV-cache row reads (per KV head, per query, per layer) saved relative to the same attention rule
without SpAtten — and ``attention_reads_saved`` at query-head granularity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import AccllmError
from .topk import keep_count, keep_q16, topk_numpy


@dataclass
class SpattenConfig:
    token_keep: list          # per layer
    head_keep: list           # per layer
    start_layer: int
    sinks: int
    recent: int
    num_layers: int
    num_heads: int

    def state_for(self, cache, device) -> "SpattenState":
        """The session's SpAtten state, kept on its cache (made on first use). algo.attention reaches
        it through the config it finds on each layer, so it needs no import of this module."""
        st = getattr(cache, "accllm_spatten_state", None)
        if st is None:
            st = SpattenState(self, device)
            cache.accllm_spatten_state = st
        return st


def _per_layer(v, L: int, key: str) -> list[float]:
    vals = v if isinstance(v, list) else [v] * L
    if len(vals) != L:
        raise AccllmError(f"recipe key {key}: a list needs one ratio per layer ({L}), got {len(vals)}")
    out = []
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0.0 < float(x) <= 1.0):
            raise AccllmError(f"recipe key {key}: keep ratios must lie in (0, 1], got {x!r}")
        out.append(float(x))
    return out


def config_from_recipe(recipe, model_config) -> SpattenConfig:
    L = model_config.num_hidden_layers
    start = recipe.spatten_start_layer
    if not isinstance(start, int) or start < 0:
        raise AccllmError(f"spatten_start_layer must be a non-negative integer, got {start!r}")
    if start >= L:
        raise AccllmError(f"spatten_start_layer={start} but the model has only {L} layers (0..{L - 1})")
    recent = recipe.spatten_recent
    if not isinstance(recent, int) or recent <= 0:
        raise AccllmError(f"spatten_recent must be a positive integer, got {recent!r}")
    if recipe.attention == "lambda":
        recent = min(recent, recipe.window)
    return SpattenConfig(_per_layer(recipe.token_keep, L, "token_keep"), _per_layer(recipe.head_keep, L, "head_keep"),
                         start, recipe.sink_tokens, recent, L, model_config.num_attention_heads)


class SpattenState:
    """Per-session importance scores and pruning decisions (lives on the session's cache)."""

    def __init__(self, cfg: SpattenConfig, device):
        self.cfg = cfg
        self.device = device
        L, H = cfg.num_layers, cfg.num_heads
        self.acc = torch.zeros(L, 0, dtype=torch.float64, device=device)       # [L, positions]
        self.pruned_at = torch.zeros(0, dtype=torch.long, device=device)        # layer a token left at
        self.head_acc = torch.zeros(L, H, dtype=torch.float64, device=device)
        self.head_pruned_at = torch.full((H,), L, dtype=torch.long, device=device)
        self.reads = {"kv": 0.0, "kv_base": 0.0, "attn": 0.0, "attn_base": 0.0}

    def _grow(self, n: int) -> None:
        cur = self.pruned_at.numel()
        if n > cur:
            new = max(n, 2 * cur)
            L = self.cfg.num_layers
            self.acc = torch.cat([self.acc, torch.zeros(L, new - cur, dtype=self.acc.dtype, device=self.device)], 1)
            self.pruned_at = torch.cat([self.pruned_at, torch.full((new - cur,), L, dtype=torch.long,
                                                                   device=self.device)])

    def token_alive(self, li: int, P: torch.Tensor) -> torch.Tensor:
        self._grow(int(P.max()) + 1)
        return self.pruned_at[P] > li

    def head_alive(self, li: int):
        alive = self.head_pruned_at > li
        return None if bool(alive.all()) else alive

    def observe(self, li, P, probs, out, vis, base_vis, head_alive, nrep) -> None:
        # token importance: probability received, summed over heads, queries (and batch)
        self.acc[li, P] += probs.double().sum(dim=(0, 1, 2))
        # head importance: L2 norm of each head's output, summed over queries (and batch)
        self.head_acc[li] += out.double().norm(dim=-1).sum(dim=(0, 2))
        H = probs.shape[1]
        alive = torch.ones(H, dtype=torch.bool, device=probs.device) if head_alive is None else head_alive
        n_vis, n_base = float(vis.sum()), float(base_vis.sum())
        kv_alive = alive.view(-1, nrep).any(dim=1).sum().item()
        self.reads["attn"] += n_vis * float(alive.sum())
        self.reads["attn_base"] += n_base * H
        self.reads["kv"] += n_vis * kv_alive
        self.reads["kv_base"] += n_base * (H // nrep)

    def decide(self, stored: torch.Tensor, last_pos: int) -> None:
        cfg = self.cfg
        L = cfg.num_layers
        cand = stored[(stored >= cfg.sinks) & (stored <= last_pos - cfg.recent)]
        cum = torch.cumsum(self.acc[:, cand], dim=0) if cand.numel() else None
        hcum = torch.cumsum(self.head_acc, dim=0)
        for li in range(cfg.start_layer, L):
            if cand.numel():
                k = keep_count(keep_q16(cfg.token_keep[li]), cand.numel())
                alive = self.pruned_at[cand] > li
                if int(alive.sum()) > k:
                    idx = alive.nonzero().flatten()
                    keep = torch.from_numpy(topk_numpy(cum[li, idx].float().cpu().numpy(), k)).to(idx.device)
                    drop = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
                    drop[keep] = False
                    self.pruned_at[cand[idx[drop]]] = li
            kh = keep_count(keep_q16(cfg.head_keep[li]), cfg.num_heads, at_least=1)
            halive = self.head_pruned_at > li
            if int(halive.sum()) > kh:
                idx = halive.nonzero().flatten()
                keep = torch.from_numpy(topk_numpy(hcum[li, idx].float().cpu().numpy(), kh)).to(idx.device)
                drop = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
                drop[keep] = False
                self.head_pruned_at[idx[drop]] = li

    def stats(self) -> dict:
        return {**read_savings(self.reads),
                "heads_pruned_per_layer": [int((self.head_pruned_at <= li).sum()) for li in range(self.cfg.num_layers)]}


def read_savings(reads: dict) -> dict:
    """``kv_reads_saved`` / ``attention_reads_saved`` from read counters {kv, kv_base, attn, attn_base} (KV rows
    per KV head, and per query head, read vs the same attention without SpAtten); the torch model and the
    functional model (sim/emu.py) count the same way."""
    return {"kv_reads_saved": 1 - reads["kv"] / reads["kv_base"] if reads["kv_base"] else 0.0,
            "attention_reads_saved": 1 - reads["attn"] / reads["attn_base"] if reads["attn_base"] else 0.0}


def install(model, recipe) -> dict:
    """Enable SpAtten on *model* (routes attention through algo.attention's kernel)."""
    from .attention import check_recipe, patch_attention
    check_recipe(recipe)
    cfg = config_from_recipe(recipe, model.config)
    n = patch_attention(model)
    for layer in model.model.layers:
        layer.self_attn.accllm_spatten = cfg
    return {"layers": n, "token_keep": cfg.token_keep[cfg.start_layer], "head_keep": cfg.head_keep[cfg.start_layer],
            "start_layer": cfg.start_layer, "recent": cfg.recent, "sinks": cfg.sinks}


def uninstall(model) -> None:
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "accllm_spatten"):
            del layer.self_attn.accllm_spatten


# --------------------------------------------------------------------------------------------
# perplexity vs keep-ratio curve from `accllm eval --json` results
# --------------------------------------------------------------------------------------------
def plot_keep_curve(results: list[dict], path: str, title: str = "SpAtten token pruning") -> list[tuple]:
    """Plot stream perplexity and KV reads saved against token_keep (one point per result);
    returns the (token_keep, ppl, kv_reads_saved) rows, sorted by keep ratio."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import atomic_write_bytes
    rows = []
    for r in results:
        keep = r["recipe"]["token_keep"]
        keep = keep[r["recipe"]["spatten_start_layer"]] if isinstance(keep, list) else keep
        rows.append((float(keep), float(r["ppl"]), float(r.get("kv", {}).get("kv_reads_saved", 0.0))))
    if not rows:
        raise AccllmError("no results to plot")
    rows.sort()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label="perplexity")
    ax.set_xlabel("token keep ratio per layer")
    ax.set_ylabel("perplexity (stream)")
    ax2 = ax.twinx()
    ax2.plot([r[0] for r in rows], [100 * r[2] for r in rows], marker="s", color="tab:orange",
             label="KV reads saved (%)")
    ax2.set_ylabel("KV reads saved (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.88), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return rows


def main(argv=None) -> int:
    import argparse
    import json
    p = argparse.ArgumentParser(prog="python -m algo.spatten",
                                description="Plot perplexity vs token keep ratio from `accllm eval --stream --json` "
                                            "outputs of SpAtten recipes (one file per keep ratio).")
    p.add_argument("results", nargs="+", help="JSON files written by accllm eval --json")
    p.add_argument("--plot", required=True, metavar="PNG")
    args = p.parse_args(argv)
    res = []
    for f in args.results:
        try:
            with open(f) as fh:
                res.append(json.load(fh))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {f}: {e}")
    rows = plot_keep_curve(res, args.plot)
    print("  token_keep  ppl        KV reads saved")
    for k, ppl, saved in rows:
        print(f"  {k:<10}  {ppl:<9.3f}  {100 * saved:.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
