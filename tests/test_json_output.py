"""``--json`` prints exactly one JSON document on stdout, whatever the command: progress, logs, simulator
output and child processes go to stderr. Every command of ``accllm`` with a --json option is run as a
subprocess and its whole stdout must parse (``bench rtl`` runs the RTL kernel under Verilator once)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_host_runtime import tiny_pkg  # noqa: F401  (the cached tiny package for sim-small)

REPO = Path(__file__).resolve().parents[1]


def _text(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return str(f)


# name -> argv builder(tmp_path, package); progress is left on where a command shows it
CASES = {
    "perf": lambda t, p: ["perf", "--model", "tiny", "--hw", "sim-small", "--json", "--plot", str(t / "r.png")],
    "eval": lambda t, p: ["eval", "--model", "tiny", "--data", _text(t), "--ctx", "128", "--chunks", "2", "--json"],
    "eval --backend emu": lambda t, p: ["eval", "--package", str(p), "--backend", "emu", "--data", _text(t),
                                        "--ctx", "32", "--chunks", "1", "--json"],
    "compile": lambda t, p: ["compile", "--model", "tiny", "--recipe", "fp", "--out", str(t / "pkg"), "--json"],
    "compile --package": lambda t, p: ["compile", "--package", str(p), "--hw", "sim-small", "--set",
                                       "token_keep=0.5", "--set", "spatten_start_layer=0", "--out", str(t / "sp"),
                                       "--json"],
    "disasm": lambda t, p: ["disasm", str(p), "--json"],
    "export": lambda t, p: ["export", "--format", "gguf", str(p), str(t / "p.gguf"), "--json"],
    "run": lambda t, p: ["run", "--package", str(p), "--backend", "emu", "--prompt", "Hello",
                         "--max-new-tokens", "3", "--ignore-eos", "--json"],
    "bench emu": lambda t, p: ["bench", "emu", "--package", str(p), "--tokens", "2", "--prompt-tokens", "2",
                               "--json"],
    "bench rtl": lambda t, p: ["bench", "rtl", "--hw", "sim-small", "--json"],
    "build-rtl": lambda t, p: ["build-rtl", "--hw", "sim-small", "--out", str(t / "rtl"), "--json"],
}


# run with --json, their whole stdout parsed, in their own tests
ELSEWHERE = {"bench soak": "tests/test_bench_soak.py", "sweep": "tests/test_sweep.py",
             "bench compile-7b": "tests/test_stream_blocks.py"}


def _json_commands():
    """The commands (and, for bench, the backends) that take --json."""
    from host import cli
    from host.cmd_bench import BACKENDS
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    names = set()
    for name, sp in sub.choices.items():
        if any("--json" in a.option_strings for a in sp._actions):
            names |= {f"bench {b}" for b in BACKENDS} if name == "bench" else {name}
    return names


def test_every_json_command_is_covered():
    assert _json_commands() <= {c.split(" --")[0] for c in CASES} | set(ELSEWHERE)


@pytest.mark.parametrize("case", list(CASES))
def test_json_stdout_is_one_document(case, tmp_path, tiny_pkg):  # noqa: F811
    argv = CASES[case](tmp_path, tiny_pkg)
    r = subprocess.run([sys.executable, "-m", "host.cli", *argv], capture_output=True, text=True, cwd=REPO,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        pytest.fail(f"`accllm {' '.join(argv)}`: stdout is not one JSON document:\n{r.stdout[:3000]}")
    assert isinstance(doc, dict) and doc


def test_emit_json_refuses_a_second_document():
    import argparse
    from host.args import emit_json
    a = argparse.Namespace(_json_document=None)
    emit_json(a, {"a": 1})
    with pytest.raises(RuntimeError, match="second"):
        emit_json(a, {"b": 2})
