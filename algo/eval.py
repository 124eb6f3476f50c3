"""The one perplexity harness of accllm.

Every perplexity in the project comes from here. The harness scores a *Scorer*: anything that,
given a session and a block of token ids, returns next-token logits for each position and keeps
the context in the session (a KV cache for torch models, device buffers for the accelerator's
functional model). Two modes:

* chunks: ``chunks`` independent windows of ``ctx`` tokens; ppl over the ctx-1 predictions each.
* stream: one long sequence of ``length`` tokens fed in blocks of ``block`` tokens through the
  session's cache; each token is predicted from everything before it that the cache keeps.
  Reports per-block perplexity (this is where Λ-shaped attention is judged).
"""
from __future__ import annotations

import math
import time
from typing import Any, Protocol

import torch

from .common import AccllmError


class Scorer(Protocol):
    name: str

    def new_session(self) -> Any: ...

    def forward(self, session: Any, ids: torch.Tensor) -> torch.Tensor:
        """Append 1-D *ids* to the session's context and return float logits [len(ids), vocab]."""


class HFScorer:
    """Scorer for a transformers causal LM. *cache_factory* (from a recipe, e.g. Λ-shaped
    attention) builds the per-session KV cache; default is the full DynamicCache."""

    def __init__(self, model, cache_factory=None, name: str = "torch"):
        self.model = model
        self.cache_factory = cache_factory
        self.name = name

    def new_session(self):
        if self.cache_factory is not None:
            cache = self.cache_factory(self.model.config)
        else:
            from transformers import DynamicCache
            cache = DynamicCache(config=self.model.config)
        return {"cache": cache, "pos": 0}

    @torch.no_grad()
    def forward(self, session, ids):
        n = ids.numel()
        pos = session["pos"]
        position_ids = torch.arange(pos, pos + n, dtype=torch.long)[None]
        out = self.model(input_ids=ids[None], cache=session["cache"], use_cache=True,
                         position_ids=position_ids)
        session["cache"] = out.cache
        session["pos"] = pos + n
        return out.logits[0].float()

    def session_stats(self, session) -> dict:
        """KV-cache memory of the session (and SpAtten's KV reads saved, if installed)."""
        from .attention import session_stats
        return session_stats(session["cache"], self.model.config)


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not enabled, leave=False)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").double()


def perplexity_chunks(scorer: Scorer, tokens: torch.Tensor, ctx: int = 1024, chunks: int = 16,
                      progress: bool = True) -> dict:
    if ctx < 2:
        raise AccllmError(f"--ctx must be at least 2 tokens, got {ctx}")
    if chunks < 1:
        raise AccllmError(f"--chunks must be at least 1, got {chunks}")
    need = ctx * chunks
    if tokens.numel() < need:
        raise AccllmError(f"the data has {tokens.numel()} tokens, fewer than ctx*chunks = {need}")
    t0 = time.time()
    total, count, per_chunk = 0.0, 0, []
    bar = _progress(need, f"ppl {scorer.name}", progress)
    for c in range(chunks):
        ids = tokens[c * ctx:(c + 1) * ctx]
        logits = scorer.forward(scorer.new_session(), ids)
        nll = _nll(logits[:-1], ids[1:])
        total += nll.sum().item()
        count += nll.numel()
        per_chunk.append(math.exp(nll.mean().item()))
        bar.update(ctx)
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    bar.close()
    return {"mode": "chunks", "ppl": math.exp(total / count), "ctx": ctx, "chunks": chunks,
            "tokens_scored": count, "chunk_ppl": per_chunk, "seconds": time.time() - t0}


def perplexity_stream(scorer: Scorer, tokens: torch.Tensor, length: int = 16384, block: int = 1024,
                      progress: bool = True) -> dict:
    if block < 1 or length < 2:
        raise AccllmError(f"--length must be >= 2 and --block >= 1 (got length={length}, block={block})")
    if tokens.numel() < length:
        raise AccllmError(f"the data has {tokens.numel()} tokens, fewer than --length {length}")
    t0 = time.time()
    ids_all = tokens[:length]
    session = scorer.new_session()
    prev_last = None
    total, count, blocks = 0.0, 0, []
    bar = _progress(length, f"stream {scorer.name}", progress)
    for start in range(0, length, block):
        ids = ids_all[start:start + block]
        logits = scorer.forward(session, ids)
        nll = _nll(logits[:-1], ids[1:]) if ids.numel() > 1 else torch.zeros(0, dtype=torch.float64)
        if prev_last is not None:
            nll = torch.cat([_nll(prev_last[None], ids[:1]), nll])
        prev_last = logits[-1]
        total += nll.sum().item()
        count += nll.numel()
        blocks.append({"start": start, "end": start + ids.numel(), "ppl": math.exp(nll.mean().item())})
        bar.update(ids.numel())
        bar.set_postfix(block_ppl=f"{blocks[-1]['ppl']:.2f}")
    bar.close()
    res = {"mode": "stream", "ppl": math.exp(total / count), "length": length, "block": block,
           "tokens_scored": count, "blocks": blocks, "seconds": time.time() - t0}
    stats = getattr(scorer, "session_stats", None)
    kv = stats(session) if stats is not None else None
    if kv is not None:
        res["kv"] = kv
    return res


def format_table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)
