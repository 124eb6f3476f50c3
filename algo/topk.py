"""Top-k selection with the semantics of the accelerator's top-k engine.

Semantics (the functional model and the RTL top-k engine implement exactly this):

* Input: a 1-D vector of scores ``s[0..n-1]`` (float; NaN is refused) and ``0 <= k <= n``.
* Order: element ``a`` *beats* element ``b`` iff ``s[a] > s[b]``, or ``s[a] == s[b]`` and ``a < b``
  (on equal scores the **lower position wins**). This is a strict total order, so the selected set
  is unique: the k elements that beat every unselected element.
* Output: the k selected positions in **ascending position order** (int64), i.e. a set, not a
  ranking. ``topk_mask`` gives the same set as a boolean mask.

Algorithm: quick-select (Hoare's FIND) with a deterministic pivot — the middle element of the
current candidate list (candidates kept in ascending position order). Each round splits the
candidates into those that beat the pivot and those the pivot beats; expected O(n) work, no
randomness, so every run (numpy, torch, hardware) takes the same decisions. A streaming hardware
engine may implement the same order with a comparator network; only the selected set is
normative, the pivot sequence is not.
"""
from __future__ import annotations

import numpy as np

from .common import AccllmError


def _check(n: int, k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise AccllmError(f"top-k: k must be an integer, got {k!r}")
    if not 0 <= k <= n:
        raise AccllmError(f"top-k: k must lie in [0, {n}] for {n} scores, got {k}")


KEEP_FRAC = 16      # keep ratios as Q0.16 numerators (the accelerator multiplies by them)


def keep_q16(ratio: float) -> int:
    """A keep ratio in (0, 1] as the Q0.16 numerator the hardware multiplies by: ceil(ratio * 2**16).
    Rounding up keeps (q * n) >> 16 == floor(ratio * n) for the usual ratios (tenths, quarters, thirds)
    at every n <= 4096; rounding to nearest would give 0.2 * 5 -> 0."""
    r = float(ratio)
    if not 0.0 < r <= 1.0:
        raise AccllmError(f"keep ratio must lie in (0, 1], got {ratio!r}")
    return max(1, min(1 << KEEP_FRAC, int(np.ceil(r * (1 << KEEP_FRAC) - 1e-6))))


def keep_count(keep_q: int, n: int, at_least: int = 0) -> int:
    """How many of *n* entries a keep ratio keeps: max(at_least, (keep_q * n) >> 16), keep_q from
    :func:`keep_q16` (so SpAtten in torch and on the accelerator take the same k)."""
    return max(int(at_least), (int(keep_q) * int(n)) >> KEEP_FRAC)


def topk_numpy(scores, k: int, rounds: list | None = None) -> np.ndarray:
    """Positions (ascending) of the k best scores; ties broken by lower position. See module doc.
    *rounds*, if given, gets (pivot index, candidates left) of every quick-select round — the rounds the
    RTL engine (hw/rtl/topk.py) takes too, for its cycle model."""
    s = np.asarray(scores)
    if s.ndim != 1:
        raise AccllmError(f"top-k: scores must be 1-D, got shape {s.shape}")
    if s.dtype.kind not in "fiub":
        raise AccllmError(f"top-k: scores must be numeric, got dtype {s.dtype}")
    n = s.shape[0]
    _check(n, k)
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise AccllmError("top-k: scores contain NaN; the order is undefined")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    cand = np.arange(n, dtype=np.int64)
    picked: list[np.ndarray] = []
    need = int(k)
    while need > 0:
        p = cand[len(cand) // 2]
        if rounds is not None:
            rounds.append((int(p), int(cand.size)))
        ps = s[p]
        cs = s[cand]
        better = (cs > ps) | ((cs == ps) & (cand < p))
        b = cand[better]
        if len(b) >= need:
            if len(b) == need:
                picked.append(b)
                break
            cand = b
            continue
        picked.append(b)
        picked.append(np.array([p], dtype=np.int64))
        need -= len(b) + 1
        cand = cand[~better & (cand != p)]
    return np.sort(np.concatenate(picked))


def topk_torch(scores, k: int):
    """Torch version of :func:`topk_numpy` (same set, same order), on the tensor's device."""
    import torch
    s = scores
    if not isinstance(s, torch.Tensor):
        raise AccllmError(f"top-k: topk_torch takes a torch.Tensor, got {type(s).__name__}")
    if s.dim() != 1:
        raise AccllmError(f"top-k: scores must be 1-D, got shape {tuple(s.shape)}")
    n = s.shape[0]
    _check(n, k)
    if s.is_floating_point() and torch.isnan(s).any():
        raise AccllmError("top-k: scores contain NaN; the order is undefined")
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=s.device)
    if k == n:
        return torch.arange(n, dtype=torch.long, device=s.device)
    cand = torch.arange(n, dtype=torch.long, device=s.device)
    picked = []
    need = int(k)
    while need > 0:
        p = cand[len(cand) // 2]
        ps = s[p]
        cs = s[cand]
        better = (cs > ps) | ((cs == ps) & (cand < p))
        b = cand[better]
        if len(b) >= need:
            if len(b) == need:
                picked.append(b)
                break
            cand = b
            continue
        picked.append(b)
        picked.append(p.reshape(1))
        need -= len(b) + 1
        cand = cand[~better & (cand != p)]
    return torch.sort(torch.cat(picked)).values


def topk(scores, k: int):
    """Dispatch on the type: torch.Tensor → :func:`topk_torch`, anything else → :func:`topk_numpy`."""
    try:
        import torch
        if isinstance(scores, torch.Tensor):
            return topk_torch(scores, k)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return topk_numpy(scores, k)


def topk_mask(scores, k: int):
    """Boolean mask (same library as *scores*) with True at the k selected positions."""
    idx = topk(scores, k)
    try:
        import torch
        if isinstance(scores, torch.Tensor):
            m = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
            m[idx] = True
            return m
    except ImportError:  # pragma: no cover
        pass
    m = np.zeros(np.asarray(scores).shape[0], dtype=bool)
    m[idx] = True
    return m


def topk_reference(scores, k: int) -> np.ndarray:
    """Sort-based reference (for tests): stable sort by descending score, first k, ascending positions."""
    s = np.asarray(scores)
    order = sorted(range(len(s)), key=lambda i: (-s[i].item(), i))       # exact for 64-bit integers too
    return np.array(sorted(order[:k]), dtype=np.int64)
