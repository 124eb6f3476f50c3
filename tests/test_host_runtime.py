"""The host runtime on a real compiled package of the `tiny` model: the functional model (emu), the RTL
under Verilator (rtl) with the same host code — identical tokens — plus the CLI (`accllm run --json`,
xrt without XRT, package-xo) and a tampered package. SmolLM2 emu vs rtl and the
rtl runs past the Λ window (the ring and SpAtten, also checked program by program in test_rtl_model.py)
are in the slow marker."""
import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from unittest import mock

from algo.common import AccllmError

REPO = Path(__file__).resolve().parents[1]


FAST_CALIB = ["--set", "calib_samples=4", "--set", "calib_seqlen=128", "--set", "block_tune_steps=8"]


def _compile(out, model="tiny", fast=True):
    from host import cli
    # the accllm recipe; for the tests with a small calibration set and a few block-tuning steps (the
    # recipe's structure is unchanged)
    small = FAST_CALIB if fast else []
    rc = cli.compile_model_main(["--model", model, "--recipe", "accllm", "--hw", "sim-small", "--out", str(out),
                                 "--no-progress"] + small)
    assert rc == 0


def _sources_digest():
    import hashlib
    h = hashlib.sha256()
    for d in ("algo", "quant", "hw"):
        for p in sorted((REPO / d).rglob("*.py")):
            h.update(p.relative_to(REPO).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def tiny_pkg():
    """compile-model of tiny for sim-small (about 90 s on 2 cores), cached by the digest of the
    sources that produce it so that later test runs reuse it; a cached copy is re-verified."""
    from algo.common import cache_dir
    from host.runtime import load_package_verified
    out = cache_dir("test-packages") / f"tiny-accllm-sim-small-{_sources_digest()}"
    if out.is_dir():
        try:
            load_package_verified(out)
            return out
        except AccllmError:
            shutil.rmtree(out)
    _compile(out)
    return out


def _run_cli(argv):
    from host import cli
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    return rc, buf.getvalue()


def test_run_emu_json(tiny_pkg):
    rc, out = _run_cli(["run", "--package", str(tiny_pkg), "--backend", "emu", "--prompt",
                        "The capital of France is", "--max-new-tokens", "8", "--json", "--ignore-eos"])
    assert rc == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert {"tokens", "text", "ttft_s", "decode_tokens_per_s"} <= set(res)
    assert len(res["tokens"]) == 8 and res["ttft_s"] > 0 and res["decode_tokens_per_s"] > 0
    # streaming generate() yields the same tokens, and chunked prefill (prompt > largest bucket) agrees
    # with feeding the same prompt token by token
    from host.runtime import open_runtime
    with open_runtime(tiny_pkg, "emu") as rt:
        ids = rt.encode("The capital of France is")
        assert list(rt.generate(ids, 8, stop_at_eos=False)) == res["tokens"]
        big = rt.proto.prefill[-1].tokens if rt.proto.prefill else 1
        long_prompt = (ids * (2 * big // len(ids) + 2))[: 2 * big + 3]
        chunked = list(rt.generate(long_prompt, 4, stop_at_eos=False))
        rt.reset()
        for t in long_prompt[:-1]:
            rt.feed([t], want=None)
        first = rt.feed(long_prompt[-1:], want="argmax")
        assert chunked[0] == first


def _emu_vs_rtl(pkg, prompt, new_tokens, **rtl_kw):
    """The same host code on both backends: generated tokens, the logits of one more step, and the
    cycles of the decode steps (rtl: the kernel's register; emu: sim/cycle.RtlCycleModel)."""
    import numpy as np
    from host.runtime import open_runtime
    res = {}
    for backend in ("emu", "rtl"):
        with open_runtime(pkg, backend, **(rtl_kw if backend == "rtl" else {})) as rt:
            toks = list(rt.generate(prompt, new_tokens, stop_at_eos=False))
            st = rt.stats
            rtl0 = getattr(rt.device, "cycles_rtl_total", 0)
            logits = np.asarray(rt.feed([toks[-1]], want="logits"))
            model_step = getattr(rt.device, "cycles_rtl_total", 0) - rtl0
            res[backend] = dict(tokens=toks, logits=logits, decode_cycles=st.decode_cycles,
                                step_cycles=rt._last_cycles, model_step_cycles=model_step)
    return res


def test_bench_emu_on_a_package_names_its_model(tiny_pkg):
    """`accllm bench emu --package DIR --json`: one JSON document naming the model the package was
    compiled from (not the default model), with a positive decode speed."""
    rc, out = _run_cli(["bench", "emu", "--package", str(tiny_pkg), "--tokens", "2", "--prompt-tokens", "2", "--json"])
    assert rc == 0
    res = json.loads(out)
    assert res["model"] == "tiny" and res["decode_tokens_per_s"] > 0


def test_emu_and_rtl_give_identical_tokens(tiny_pkg):
    """The whole tiny model on the RTL (full AccLLM recipe): prefill of a prompt and 16 decode steps
    on the RTL under Verilator; every token and the final logits bit-exact with the functional model;
    the as-built cycle model within 10 % of the kernel's cycle register."""
    from sim.rtlsim.device import missing_units
    assert missing_units((tiny_pkg / "program.bin").read_bytes()) == []
    r = _emu_vs_rtl(tiny_pkg, "Hello", 17)
    assert len(r["rtl"]["tokens"]) == 17
    assert r["rtl"]["tokens"] == r["emu"]["tokens"]
    assert r["rtl"]["logits"].shape == r["emu"]["logits"].shape
    assert (r["rtl"]["logits"] == r["emu"]["logits"]).all(), "final logits differ between rtl and emu"
    measured, predicted = r["rtl"]["step_cycles"], r["emu"]["model_step_cycles"]
    assert measured > 0 and abs(measured / predicted - 1) < 0.10, (measured, predicted)


@pytest.mark.slow
def test_emu_and_rtl_identical_tokens_on_icarus(tiny_pkg):
    """The whole tiny model on Icarus (the second simulator; ~100x slower than Verilator: prefill of a
    short prompt and the first token only, ~0.4M cycles): tokens and the final logits equal emu's."""
    r = _emu_vs_rtl(tiny_pkg, "Hi", 1, simulator="icarus")
    assert r["rtl"]["tokens"] == r["emu"]["tokens"]
    assert (r["rtl"]["logits"] == r["emu"]["logits"]).all(), "final logits differ between rtl (icarus) and emu"


@pytest.fixture(scope="module")
def tiny_w8_pkg(tmp_path_factory):
    """tiny, accllm recipe with S=2 sinks and a W=8 window (so a short run wraps the ring)."""
    from host import cli
    out = tmp_path_factory.mktemp("w8") / "tiny-w8"
    rc = cli.compile_model_main(["--model", "tiny", "--recipe", "accllm", "--hw", "sim-small", "--out", str(out),
                                 "--no-progress", *FAST_CALIB, "--set", "sink_tokens=2", "--set", "window=8"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_emu_and_rtl_identical_past_the_window(tiny_w8_pkg):
    """Λ ring buffer on the RTL: tiny with S=2 sinks and a W=8 window decodes 20 tokens past a 4-token
    prompt, so the window wraps twice; tokens and final logits equal emu's."""
    r = _emu_vs_rtl(tiny_w8_pkg, [101, 2034, 318, 257], 20)
    assert r["rtl"]["tokens"] == r["emu"]["tokens"]
    assert (r["rtl"]["logits"] == r["emu"]["logits"]).all()


@pytest.mark.slow
def test_spatten_emu_and_rtl_identical_past_the_window(tiny_w8_pkg, tmp_path):
    """SpAtten on the RTL (ATTN.spatten + TOPK, the RTL top-k engine): the W=8 package plus token_keep 0.5,
    head_keep 0.5 from layer 0 (`compile --package --set`), a 12-token prompt in one prefill block, then
    decode through the window wraps; every step prunes tokens and heads; tokens, final logits and the
    SpAtten state (importance, pruned flags) equal emu's."""
    import numpy as np
    from sim.rtlsim.device import missing_units
    from host.runtime import open_runtime
    sp = tmp_path / "sp"
    rc, _ = _run_cli(["compile", "--package", str(tiny_w8_pkg), "--hw", "sim-small", "--set", "token_keep=0.5",
                      "--set", "head_keep=0.5", "--set", "spatten_start_layer=0", "--set", "spatten_recent=2",
                      "--out", str(sp)])
    assert rc == 0
    assert missing_units((sp / "program.bin").read_bytes()) == []
    spm = json.loads((sp / "memmap.json").read_text())["spatten"]
    prompt = [101, 2034, 318, 257, 1996, 3007, 1997, 2605, 2003, 3000, 1010, 1996]
    res = {}
    for backend in ("emu", "rtl"):
        with open_runtime(sp, backend) as rt:
            toks = list(rt.generate(prompt, 12, stop_at_eos=False))
            rtl0 = getattr(rt.device, "cycles_rtl_total", 0)
            logits = np.asarray(rt.feed([toks[-1]], want="logits"))
            state = rt.buffers["weights0"].download(spm["state_bytes"], spm["state"])
            res[backend] = dict(tokens=toks, logits=logits, state=np.frombuffer(state, np.uint8),
                                step_cycles=rt._last_cycles, model_step_cycles=rt.device.cycles_rtl_total - rtl0
                                if backend == "emu" else None)
    assert res["rtl"]["tokens"] == res["emu"]["tokens"]
    assert (res["rtl"]["logits"] == res["emu"]["logits"]).all()
    # the as-built cycle model (ATTN.spatten, TOPK terms) against the kernel's cycle register, one decode step
    measured, predicted = res["rtl"]["step_cycles"], res["emu"]["model_step_cycles"]
    print(f"SpAtten decode step: {measured} cycles (RTL), {predicted} (RtlCycleModel)")
    assert measured > 0 and abs(measured / predicted - 1) < 0.10, (measured, predicted)
    assert (res["rtl"]["state"] == res["emu"]["state"]).all(), "SpAtten state differs between rtl and emu"
    # the run did prune: some token and some head flags are set in the last layer
    lay = spm["layer_bytes"]
    last = res["emu"]["state"][lay:2 * lay]
    assert last[spm["dead_off"]:spm["dead_off"] + 8].any() and last[spm["hdead_off"]:spm["hdead_off"] + 4].any()


def test_rtl_refuses_program_with_units_missing_from_the_kernel(tiny_pkg, tmp_path):
    from hw import isa
    from sim.rtlsim.device import RtlUnsupported, missing_units
    from host.runtime import open_runtime
    prog = isa.encode_program([isa.Instr(isa.ATTN, a=0, b=0, c=0, d=0), isa.Instr(isa.END)])
    with mock.patch.dict("hw.rtl.kernel.UNITS", {}, clear=True):
        assert missing_units(prog) == ["ATTN"]
        with pytest.raises(RtlUnsupported, match="does not implement .*EMBED"):
            open_runtime(tiny_pkg, "rtl")


def test_spatten_on_an_existing_package_emu_vs_torch(tiny_pkg, tmp_path):
    """`compile --package --set token_keep=...` adds SpAtten without recompression; the fake-quant torch
    model and the functional model then prune in stream mode with the same read savings and close
    perplexities; the RTL kernel has every unit the program needs (ATTN.spatten, TOPK)."""
    from sim.rtlsim.device import missing_units
    sp = tmp_path / "sp"
    sets = ["--set", "token_keep=0.5", "--set", "head_keep=0.5", "--set", "spatten_start_layer=0",
            "--set", "spatten_recent=16"]
    rc, _ = _run_cli(["compile", "--package", str(tiny_pkg), "--hw", "sim-small", "--set", "spatten_start_layer=2",
                      "--set", "token_keep=0.5", "--out", str(sp)])
    assert rc == 2 and not sp.exists()                  # tiny has 2 layers: refused, nothing written
    rc, _ = _run_cli(["compile", "--package", str(tiny_pkg), "--hw", "sim-small", *sets, "--out", str(sp)])
    assert rc == 0
    man = json.loads((sp / "manifest.json").read_text())
    assert man["recipe"]["token_keep"] == 0.5 and man["recipe_changes"][-1]["keys"]["head_keep"] == 0.5
    assert json.loads((tiny_pkg / "manifest.json").read_text())["recipe"]["token_keep"] == 1.0
    assert missing_units((sp / "program.bin").read_bytes()) == []
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    res = {}
    for backend in ([], ["--backend", "emu"]):
        rc, out = _run_cli(["eval", "--package", str(sp), *backend, "--data", str(f), "--stream", "--length", "192",
                            "--block", "32", "--json", "--no-progress"])
        assert rc == 0
        res[bool(backend)] = json.loads(out)
    t, e = res[False], res[True]
    assert 0.2 < t["kv"]["kv_reads_saved"] < 0.9
    assert abs(e["kv"]["kv_reads_saved"] - t["kv"]["kv_reads_saved"]) < 1e-9
    assert abs(e["ppl"] / t["ppl"] - 1) < 0.02, (e["ppl"], t["ppl"])


def test_tampered_package_is_refused(tiny_pkg, tmp_path):
    from host.runtime import open_runtime
    bad = tmp_path / "bad"
    shutil.copytree(tiny_pkg, bad)
    victim = sorted(p for p in bad.iterdir() if p.suffix in (".bin", ".safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(AccllmError, match=victim.name):
        open_runtime(bad, "emu")
    m = json.loads((tiny_pkg / "manifest.json").read_text())
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AccllmError, match="format_version"):
        open_runtime(bad, "emu")


def test_package_compiled_for_other_hw_is_refused(tiny_pkg):
    from hw.config import load_hw
    from host.runtime import open_runtime
    with pytest.raises(AccllmError, match="compiled for hardware configuration 'sim-small'"):
        open_runtime(tiny_pkg, "emu", hw=load_hw("u280"))


def test_xrt_without_xrt_is_one_line(tiny_pkg):
    r = subprocess.run([str(REPO / ".venv/bin/accllm"), "run", "--package", str(tiny_pkg), "--backend", "xrt",
                        "--prompt", "hi"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and "pyxrt" in r.stderr


def test_package_xo(tiny_pkg, tmp_path):
    from hw import regmap
    from hw.config import load_hw
    hw = load_hw("sim-small")
    rc, out = _run_cli(["package-xo", "--package", str(tiny_pkg), "--out", str(tmp_path / "xo")])
    assert rc == 0
    xo = tmp_path / "xo"
    tcl = (xo / "package_xo.tcl").read_text()
    assert "package_xo -xo_path" in tcl and "kernel.xml" in tcl and (xo / "kernel.xml").is_file()
    cfg = (xo / "connectivity.cfg").read_text()
    sp = [l for l in cfg.splitlines() if l.startswith("sp=")]
    ports = {a.port for a in regmap.arguments(hw) if a.port}
    assert len(sp) == len(ports)
    mm = json.loads((tiny_pkg / "memmap.json").read_text())
    bufs = mm["buffers"]
    import re
    conn = {}
    for line in sp:
        m = re.fullmatch(r"sp=accllm_kernel_1\.(\w+):HBM\[(\d+)(?::(\d+))?\]", line)
        assert m, line
        conn[m.group(1)] = (int(m.group(2)), int(m.group(3) or m.group(2)))
    for name, b in (bufs.items() if isinstance(bufs, dict) else ((b["name"], b) for b in bufs)):
        lo, hi = conn[b["port"]]
        assert lo <= b["bank"] <= hi, (name, b, conn)
    assert "has not been run on a card" in (xo / "README.md").read_text() or \
        "Nothing in this directory has been run on a card" in (xo / "README.md").read_text()
    assert list((xo / "rtl").glob("*.v"))


@pytest.mark.slow
def test_smollm2_emu_and_rtl_identical_tokens(tmp_path):
    from host.runtime import open_runtime
    out = tmp_path / "smollm2"
    _compile(out, "smollm2-135m", fast=False)
    r = _emu_vs_rtl(out, "The capital of France is", 3)
    assert r["rtl"]["tokens"] == r["emu"]["tokens"]
    assert (r["rtl"]["logits"] == r["emu"]["logits"]).all()
    print("smollm2 rtl cycles per decode step", r["rtl"]["step_cycles"], "model", r["emu"]["model_step_cycles"])


def test_package_of_an_older_memory_map_is_compiled_again(tiny_pkg, tmp_path):
    """A package whose program an older accllm made (memmap v1) is refused with the command that fixes
    it, and `accllm compile --package` (stage 2 only) makes it run again, in place or into --out."""
    from algo.common import sha256_file
    from hw import memmap
    from host.runtime import open_runtime
    from quant.package import write_manifest
    old = tmp_path / "old"
    shutil.copytree(tiny_pkg, old)
    mm = json.loads((old / "memmap.json").read_text())
    mm["version"] = memmap.VERSION - 1
    (old / "memmap.json").write_text(json.dumps(mm))
    man = json.loads((old / "manifest.json").read_text())
    man["files"]["memmap.json"] = sha256_file(old / "memmap.json")
    man["program"]["compiler_digest"] = "older"
    write_manifest(old, man)                         # as that accllm wrote it
    with pytest.raises(AccllmError, match="accllm compile --package DIR --hw CONFIG --out DIR"):
        open_runtime(old, "emu")
    rc, _ = _run_cli(["compile", "--package", str(old), "--hw", "sim-small", "--set", "window=8", "--out", str(old)])
    assert rc == 2                                   # compression settings need a full compile
    rc, out = _run_cli(["compile", "--package", str(old), "--hw", "sim-small", "--out", str(tmp_path / "new")])
    assert rc == 0 and "compiled" in out
    rc, out = _run_cli(["compile", "--package", str(old), "--hw", "sim-small", "--out", str(old)])
    assert rc == 0 and "in place" in out
    for d in (old, tmp_path / "new"):
        assert (d / "memmap.json").read_bytes() == (tiny_pkg / "memmap.json").read_bytes()
        rt = open_runtime(d, "emu")
        rt.close()


def test_rtl_verilog_generation_keeps_stdout_clean(tmp_path, monkeypatch, capsys):
    """`accllm run/bench --backend rtl --json` on a fresh cache: the Verilog generation it triggers logs to
    stderr, so stdout stays one JSON document."""
    from hw.config import load_hw
    from hw.rtl import kernel
    from sim.rtlsim.device import ensure_rtl

    def chatty_generator(cfg):            # stands in for Amaranth and yosys writing to stdout while they run
        print("yosys: 42 cells")
        return "module accllm_kernel(); endmodule\n"
    monkeypatch.setattr(kernel, "kernel_verilog", chatty_generator)
    monkeypatch.setenv("ACCLLM_CACHE", str(tmp_path / "cache"))
    out = ensure_rtl(load_hw("sim-small"), progress=True)
    assert any(out.glob("*.v"))
    cap = capsys.readouterr()
    assert cap.out == "", cap.out[:200]
    assert "generating" in cap.err and "yosys: 42 cells" in cap.err


def test_tasks_score_through_the_device(tiny_pkg):
    """`accllm eval --package P --backend emu --tasks`: every lm-eval request is one fresh session of
    the functional model (4 choices x 3 documents of capitals = 12 sessions)."""
    from algo.tasks import evaluate_tasks
    from host.runtime import DeviceScorer, open_runtime, tokenizer_for
    from quant.package import load_package
    pkg = load_package(tiny_pkg)
    with open_runtime(tiny_pkg, "emu", owner="test") as rt:
        scorer = DeviceScorer(rt)
        res = evaluate_tasks(scorer, tokenizer_for(pkg.dir, pkg.manifest), ["capitals"], limit=3)
    assert scorer._current == 12
    assert res["capitals"]["n"] == 3 and 0 <= res["capitals"]["acc"] <= 1
