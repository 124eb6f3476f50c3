"""Evaluation texts of several domains (pydoc, pycode) and ``accllm eval`` over several sources."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from algo.common import AccllmError
from algo.data import (BUILT, NAMES, PYCODE_CALIB_MODULES, PYCODE_MODULES, build_text, data_path,
                       python_version, read_text)

ROOT = Path(__file__).resolve().parents[1]
ACCLLM = [sys.executable, "-m", "host.cli"]
SINGLE_KEYS = {"mode", "ppl", "ctx", "chunks", "tokens_scored", "chunk_ppl", "seconds", "model", "recipe",
               "data", "wall_seconds"}


def _cli(*args):
    return subprocess.run(ACCLLM + list(args), capture_output=True, text=True, cwd=ROOT, timeout=600)


def _long_lines(text, n=40):
    return {line.strip() for line in text.splitlines() if len(line.strip()) > n}


def test_built_text_is_deterministic(tmp_path, monkeypatch):
    code = ("import hashlib; from algo.data import build_text; "
            "print(' '.join(hashlib.sha256(build_text(n).encode()).hexdigest() for n in "
            "('pydoc', 'pydoc-calib', 'pycode', 'pycode-calib')))")
    here = " ".join(hashlib.sha256(build_text(n).encode()).hexdigest() for n in
                    ("pydoc", "pydoc-calib", "pycode", "pycode-calib"))
    for seed in ("1", "2"):                     # another process, another hash seed: the same bytes
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == here.split()
    monkeypatch.setenv("ACCLLM_CACHE", str(tmp_path))
    p = data_path("pydoc")                      # built into the cache, named by the Python version
    assert p.parent == tmp_path / "data" and python_version().split()[1] in p.name
    assert p.read_bytes() == build_text("pydoc").encode("utf-8")
    mtime = p.stat().st_mtime_ns
    assert data_path("pydoc") == p and p.stat().st_mtime_ns == mtime
    assert [f.name for f in (tmp_path / "data").iterdir()] == [p.name]      # no temporary left behind


def test_built_texts_are_their_domains():
    doc, code = build_text("pydoc"), build_text("pycode")
    assert len(doc) > 200_000 and len(code) > 200_000
    assert doc.startswith('The "assert" statement\n')      # the first topic in sorted key order
    headers = [line for line in code.splitlines() if line.startswith("# file: ")]
    assert headers == [f"# file: {m.replace('.', '/')}.py" for m in sorted(PYCODE_MODULES)]
    compile(code, "pycode", "exec")             # the modules concatenated are still Python


def test_calibration_parts_share_no_long_line_with_evaluation():
    assert not set(PYCODE_MODULES) & set(PYCODE_CALIB_MODULES)
    for ev, cal in (("pydoc", "pydoc-calib"), ("pycode", "pycode-calib")):
        e, c = build_text(ev), build_text(cal)
        assert len(c) > 100_000, cal
        shared = _long_lines(e) & _long_lines(c)
        assert not shared, f"{ev} / {cal} share {len(shared)} lines, e.g. {sorted(shared)[:3]}"


def test_unknown_dataset_refused_with_names():
    with pytest.raises(AccllmError) as e:
        data_path("wikipedia")
    for name in NAMES:
        assert name in str(e.value)
    assert set(BUILT) <= set(NAMES)
    r = _cli("eval", "--model", "tiny", "--data", "pydoc", "--data", "wikipedia", "--chunks", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "'wikipedia'" in r.stderr and "pydoc" in r.stderr and "pycode" in r.stderr and "wikitext2" in r.stderr


def test_cli_eval_one_source_json_schema():
    r = _cli("eval", "--model", "tiny", "--data", "pydoc", "--ctx", "64", "--chunks", "2", "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == SINGLE_KEYS | {"data_python"}
    assert out["data"] == "pydoc" and out["data_python"] == python_version()
    assert out["ppl"] > 1 and out["tokens_scored"] == 2 * 63


def test_cli_eval_several_sources(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    args = ["eval", "--model", "tiny", "--data", "pydoc", "--data", str(f), "--data", "pycode",
            "--ctx", "64", "--chunks", "2", "--no-progress"]
    r = _cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)                  # exactly one JSON document
    assert set(out) == {"model", "recipe", "wall_seconds", "results"}
    assert [x["data"] for x in out["results"]] == ["pydoc", str(f), "pycode"]
    for x in out["results"]:
        want = SINGLE_KEYS - {"model", "recipe", "wall_seconds"}
        assert set(x) == (want | {"data_python"} if x["data"] in BUILT else want)
        assert x["ppl"] > 1 and x["tokens_scored"] == 2 * 63 and x["chunks"] == 2
    ppl = {x["data"]: x["ppl"] for x in out["results"]}
    r = _cli(*args)                             # the table: one row per source
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.strip()}
    for d, p in ppl.items():
        assert rows[d][0] == f"{p:.3f}" and rows[d][1] == "126"
    assert python_version() in r.stdout


def test_cli_eval_refuses_short_source(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("a few words only")
    r = _cli("eval", "--model", "tiny", "--data", "pydoc", "--data", str(f), "--ctx", "64", "--chunks", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "short.txt has 4 tokens" in r.stderr and "--ctx 64 x --chunks 2 = 128" in r.stderr
    r = _cli("eval", "--model", "tiny", "--data", "pydoc", "--data", "pydoc", "--chunks", "1")
    assert r.returncode == 2 and "given twice" in r.stderr


def test_read_text_of_built_source_matches_build():
    assert read_text("pycode-calib") == build_text("pycode-calib")
