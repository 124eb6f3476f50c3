"""Evaluation and calibration text.

``wikitext2`` means WikiText-2 *test* (reporting only); ``wikitext2-valid`` its validation split,
the only source of calibration data today. The directory is ``$ACCLLM_DATA`` if set, else
``../shared/data/wikitext-2`` beside the checkout (not for an installed wheel) or beside the current directory.

Two more domains are built from the running Python itself, so every install has them and nothing
is downloaded (the text depends on the Python version, see :func:`python_version`):

* ``pydoc``: technical documentation prose, the reference-manual topics of
  ``pydoc_data.topics.topics`` (the even positions of the sorted keys), joined in sorted key order;
  a paragraph repeating a line of an earlier one (topics nest) is left out.
* ``pycode``: source code, the pure-Python standard-library modules of ``PYCODE_MODULES``,
  each file verbatim after a ``# file: NAME.py`` header line.

``pydoc-calib`` / ``pycode-calib`` are disjoint calibration parts of the same domains (the odd
topic keys; the modules of ``PYCODE_CALIB_MODULES``), from which every paragraph (pydoc) or line
(pycode) that shares a line of more than 40 characters with the evaluation part is removed. The
built text is cached under ``cache_dir("data")``, keyed by the Python version.

Nothing is ever downloaded. Any other value is taken as the path of a UTF-8 text file.
"""
from __future__ import annotations

import os
import platform
import re
import sys
import sysconfig
from pathlib import Path

from .common import AccllmError, atomic_write_text, cache_dir, installed, source_root

DATASETS = {"wikitext2": "test.txt", "wikitext2-test": "test.txt", "wikitext2-valid": "valid.txt"}

# Standard-library modules of ``pycode`` (evaluation) and ``pycode-calib``: pure Python, stable,
# no two in both lists. Evaluation modules are moderate in size, so that the first 16 x 1024 tokens
# already span several of them.
PYCODE_MODULES = (
    "base64", "bisect", "calendar", "cmd", "colorsys", "contextlib", "copy", "csv", "fnmatch",
    "fractions", "gettext", "glob", "graphlib", "heapq", "hmac", "json.decoder", "json.encoder",
    "numbers", "pprint", "queue", "sched", "shlex", "string", "textwrap",
)
PYCODE_CALIB_MODULES = (
    "argparse", "ast", "configparser", "dataclasses", "datetime", "difflib", "enum", "functools",
    "ipaddress", "locale", "logging", "optparse", "pathlib", "selectors", "shutil", "statistics",
    "tempfile", "threading", "tokenize", "uuid",
)
# name -> (domain, part) of the texts built from the running Python.
BUILT = {"pydoc": ("pydoc", "eval"), "pydoc-calib": ("pydoc", "calib"),
         "pycode": ("pycode", "eval"), "pycode-calib": ("pycode", "calib")}
EVAL_NAMES = ("wikitext2", "pydoc", "pycode")
CALIB_NAMES = ("wikitext2-valid", "pydoc-calib", "pycode-calib")
NAMES = (*DATASETS, *BUILT)
SHARED_LINE_CHARS = 40          # calibration parts share no line longer than this with evaluation
_BUILD_FORMAT = 1               # bump when the construction changes: it names the cached file


def python_version() -> str:
    """The Python the built texts come from, e.g. ``CPython 3.11.7``."""
    return f"{platform.python_implementation()} {platform.python_version()}"


def is_built(data: str) -> bool:
    return data in BUILT


def _norm(line: str) -> str:
    return " ".join(line.split())


def long_lines(text: str) -> set[str]:
    """The lines of *text* longer than SHARED_LINE_CHARS, whitespace-normalized."""
    return {n for n in map(_norm, text.splitlines()) if len(n) > SHARED_LINE_CHARS}


def _keep_new(blocks, seen: set[str]) -> list[str]:
    """Blocks none of whose long lines is in *seen* (which then takes theirs), in order."""
    kept = []
    for b in blocks:
        lines = long_lines(b)
        if lines & seen:
            continue
        seen |= lines
        kept.append(b)
    return kept


def _pydoc_parts() -> tuple[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise AccllmError(f"pydoc: this Python ({python_version()}) has no pydoc_data.topics ({e})") from None
    keys = sorted(topics)
    paras = lambda ks: [p.strip("\n") for k in ks for p in re.split(r"\n[ \t]*\n", topics[k])
                        if p.strip()]
    seen: set[str] = set()
    ev = "\n\n".join(_keep_new(paras(keys[0::2]), seen)) + "\n"
    cal = "\n\n".join(_keep_new(paras(keys[1::2]), seen)) + "\n"
    return ev, cal


def _module_source(name: str) -> tuple[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rel = name.replace(".", "/")
    for cand in (f"{rel}.py", f"{rel}/__init__.py"):
        if (stdlib / cand).is_file():
            with open(stdlib / cand, encoding="utf-8") as f:       # universal newlines: "\n" only
                return cand, f.read()
    raise AccllmError(f"pycode: the source of standard-library module {name} is not installed "
                      f"(looked for {rel}.py under {stdlib}); pycode needs the standard library's .py files")


def _pycode_part(modules, drop: set[str] | None) -> str:
    out = []
    for name in sorted(modules):
        rel, src = _module_source(name)
        if drop is not None:
            src = "".join(l for l in src.splitlines(keepends=True) if _norm(l) not in drop)
        out.append(f"# file: {rel}\n{src.rstrip()}\n")
    return "\n".join(out)


def build_text(name: str) -> str:
    """The text of a built dataset (``pydoc``, ``pydoc-calib``, ``pycode``, ``pycode-calib``),
    made afresh from the running Python: the same Python gives the same text, byte for byte."""
    domain, part = BUILT[name]
    if domain == "pydoc":
        ev, cal = _pydoc_parts()
        return ev if part == "eval" else cal
    ev = _pycode_part(PYCODE_MODULES, None)
    return ev if part == "eval" else _pycode_part(PYCODE_CALIB_MODULES, long_lines(ev))


def _built_path(name: str) -> Path:
    tag = f"{sys.implementation.name}-{platform.python_version()}"
    p = cache_dir("data") / f"{name}-{tag}-f{_BUILD_FORMAT}.txt"
    if not p.is_file():
        atomic_write_text(p, build_text(name))
    return p


def _wikitext_dirs() -> list[Path]:
    env = os.environ.get("ACCLLM_DATA")
    if env:
        return [Path(env)]
    beside = [] if installed() else [source_root().parent / "shared" / "data" / "wikitext-2"]   # the checkout's
    return beside + [Path.cwd().parent / "shared" / "data" / "wikitext-2", Path.cwd() / "shared" / "data" / "wikitext-2"]


def data_path(data: str) -> Path:
    """Resolve a dataset name or a file path to an existing file, or raise AccllmError.
    A built dataset (``pydoc``, ``pycode``, ...) is built into the cache on first use."""
    if data in BUILT:
        return _built_path(data)
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
        raise AccllmError(f"data {data!r} is neither a dataset name ({', '.join(NAMES)}) nor an existing file")
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
    cut = len(text) if max_tokens is None else max(8 * max_tokens, 4096)
    # Tokenize a generous prefix only: ~4 characters a token in English, x2 margin; the whole text
    # when the prefix falls short, so that a short count is the text's own.
    ids = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    if cut < len(text) and len(ids) < max_tokens:
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
