"""Evaluation and calibration text.

``wikitext2`` means WikiText-2 *test* (reporting only); ``wikitext2-valid`` its validation split,
the only source of calibration data. The directory is ``$ACCLLM_DATA`` if set, else
``../shared/data/wikitext-2`` beside the checkout (or beside the current directory). Nothing is
ever downloaded. Any other value is taken as the path of a UTF-8 text file.
"""
from __future__ import annotations

import os
from pathlib import Path

from .common import AccllmError

DATASETS = {"wikitext2": "test.txt", "wikitext2-test": "test.txt", "wikitext2-valid": "valid.txt"}


def _wikitext_dirs() -> list[Path]:
    env = os.environ.get("ACCLLM_DATA")
    if env:
        return [Path(env)]
    repo = Path(__file__).resolve().parents[1]
    return [repo.parent / "shared" / "data" / "wikitext-2", Path.cwd().parent / "shared" / "data" / "wikitext-2",
            Path.cwd() / "shared" / "data" / "wikitext-2"]


def data_path(data: str) -> Path:
    """Resolve a dataset name or a file path to an existing file, or raise AccllmError."""
    if data in DATASETS:
        fname = DATASETS[data]
        tried = []
        for d in _wikitext_dirs():
            p = d / fname if not d.is_file() else d
            if p.is_file():
                return p
            tried.append(str(p))
        raise AccllmError(f"WikiText-2 file {fname} not found (looked at {', '.join(tried)}); set ACCLLM_DATA "
                          f"to the wikitext-2 directory or pass --data PATH to a UTF-8 text file")
    p = Path(data)
    if not p.is_file():
        raise AccllmError(f"data {data!r} is neither a dataset name ({', '.join(DATASETS)}) nor an existing file")
    return p


def read_text(data: str) -> str:
    p = data_path(data)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AccllmError(f"{p}: not UTF-8 text ({e})") from None


def load_tokens(data: str, tokenizer, max_tokens: int | None = None):
    """Tokenize a dataset (no BOS added) and return a 1-D LongTensor, optionally truncated."""
    import torch
    text = read_text(data)
    if max_tokens is not None:
        # Tokenize a generous prefix only: ~4 characters a token in English, x2 margin.
        text = text[: max(8 * max_tokens, 4096)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    t = torch.tensor(ids, dtype=torch.long)
    return t if max_tokens is None else t[:max_tokens]


def calibration_batches(tokenizer, n_samples: int, seqlen: int, seed: int = 0):
    """Random windows of WikiText-2 *valid* (never test) for calibration: LongTensor [n, seqlen]."""
    import torch
    toks = load_tokens("wikitext2-valid", tokenizer)
    if toks.numel() <= seqlen:
        raise AccllmError(f"calibration text has {toks.numel()} tokens, fewer than seqlen {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, toks.numel() - seqlen, (n_samples,), generator=g)
    return torch.stack([toks[s: s + seqlen] for s in starts.tolist()])
