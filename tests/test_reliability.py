"""Bad input gets one clear line, never a traceback or a silently wrong figure; --json output is one document."""
import json
import subprocess
import sys

import pytest

from algo.common import AccllmError


@pytest.mark.parametrize("setting, words", [
    ("clock_mhz=0", "clock_mhz must lie in"),
    ("clock_mhz=-5", "clock_mhz must lie in"),
    ("clock_mhz=nan", "finite number"),
    ("hbm_efficiency=0", "hbm_efficiency must lie in"),
    ("hbm_efficiency=1.5", "hbm_efficiency must lie in"),
    ("weight_ports=33", "weight_ports must lie in"),
    ("burst_beats=0", "burst_beats must lie in"),
    ("outstanding_reads=-1", "outstanding_reads must lie in"),
    ("port_width_bits=128", "256 or 512"),
    ("mac_rows=2.5", "takes a number"),
])
def test_hardware_overrides_out_of_range_are_refused(setting, words):
    from hw.config import load_hw
    with pytest.raises(AccllmError, match=words):
        load_hw("u280", [setting])


def test_hardware_config_from_a_manifest_is_type_checked():
    from hw.config import PRESETS, hw_from_dict
    d = dict(PRESETS["sim-small"])
    hw_from_dict(d)
    for key, bad in (("weight_ports", True), ("clock_mhz", "100"), ("max_context", 2048.0)):
        with pytest.raises(AccllmError, match=key):
            hw_from_dict({**d, key: bad})


def test_perf_with_a_zero_clock_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "host.cli", "perf", "--model", "llama2-7b", "--hw", "u280",
                        "--hw-set", "clock_mhz=0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "clock_mhz must lie in" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("kw", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(temperature=-0.5), dict(top_p=float("nan")), dict(top_p=0.0)])
def test_sampling_settings_out_of_range_are_refused(kw):
    from host.runtime import Sampling
    with pytest.raises(AccllmError):
        Sampling(**kw)


def test_stdout_to_stderr_covers_child_processes(capfd):
    from algo.common import stdout_to_stderr
    with stdout_to_stderr():
        print("from python")
        subprocess.run([sys.executable, "-c", "print('from a child')"], check=True)
    print(json.dumps({"ok": 1}))
    cap = capfd.readouterr()
    assert json.loads(cap.out) == {"ok": 1}
    assert "from python" in cap.err and "from a child" in cap.err


@pytest.mark.parametrize("text, words", [
    ("weight_bits = 2.0", "weight_bits takes an integer"),
    ("high_precision_layers = 5", "high_precision_layers takes a list of names"),
    ("window = true", "window takes an integer"),
    ("act_order = 5", "act_order takes true or false"),
    ("smooth_alpha = nan", "smooth_alpha takes a finite number"),
    ("token_keep = false", "token_keep takes a finite number"),
])
def test_recipe_file_values_of_the_wrong_type_are_refused(tmp_path, text, words):
    from algo.recipe import load_recipe
    f = tmp_path / "r.toml"
    f.write_text(text + "\n")
    with pytest.raises(AccllmError, match=words):
        load_recipe("accllm", recipe_file=str(f))


def test_every_preset_passes_the_type_check():
    from algo.recipe import PRESETS, load_recipe
    for name in PRESETS:
        load_recipe(name)


def test_sigterm_during_compile_leaves_no_partial_directory(tmp_path):
    """SIGTERM is cleaned up like Ctrl-C: the temporary package directory beside --out is removed."""
    import signal
    import time
    out = tmp_path / "pkg"
    p = subprocess.Popen([sys.executable, "-m", "host.cli", "compile", "--model", "tiny", "--recipe", "w2a8kv4",
                          "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(x.name.endswith(".partial") for x in tmp_path.iterdir()):
            if p.poll() is not None:
                pytest.fail(f"the compile ended (exit {p.returncode}) before its temporary directory appeared:\n"
                            + p.communicate()[1][-2000:])
            if time.monotonic() > deadline:
                pytest.fail("no temporary directory beside --out within 240 s of starting the compile")
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:             # the test failed: do not leave the compile running
            p.kill()
            p.communicate()
    assert p.returncode == 143, err[-2000:]
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []



@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory):
    """A small package (tiny, W2A8KV4, fast calibration) compiled through the CLI."""
    out = tmp_path_factory.mktemp("rel") / "pkg"
    r = subprocess.run([sys.executable, "-m", "host.cli", "compile", "--model", "tiny", "--recipe", "w2a8kv4",
                        "--set", "calib_samples=2", "--set", "calib_seqlen=64", "--set", "block_tune_steps=4",
                        "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("edit", [
    ("model_config", "rms_norm_eps", 1e5), ("recipe", "kv_bits", 8), ("recipe", "window", 16),
    ("model_config", "rope_theta", 500000.0), ("model_config", "hidden_size", 1000),
    ("model_config", "vocab_size", 7),
])
def test_an_edited_manifest_is_refused(tiny_package, tmp_path, edit):
    """Any edit of manifest.json that keeps it valid JSON is caught by its digest, with one clear line."""
    import shutil
    from quant.package import load_package
    bad = tmp_path / "bad"
    shutil.copytree(tiny_package, bad)
    man = json.loads((bad / "manifest.json").read_text())
    sec, key, val = edit
    man[sec][key] = val
    (bad / "manifest.json").write_text(json.dumps(man, indent=1))
    with pytest.raises(AccllmError, match="manifest.json was changed after it was written"):
        load_package(bad)
    r = subprocess.run([sys.executable, "-m", "host.cli", "eval", "--package", str(bad), "--chunks", "1",
                        "--ctx", "32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "changed after it was written" in r.stderr


def test_manifest_format_version_must_be_the_integer(tiny_package, tmp_path):
    import shutil
    from quant.package import DIGEST_KEY, load_package, manifest_digest
    bad = tmp_path / "bad"
    shutil.copytree(tiny_package, bad)
    man = json.loads((bad / "manifest.json").read_text())
    man["format_version"] = True
    man[DIGEST_KEY] = manifest_digest(man)              # even with a matching digest
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(AccllmError, match="format_version True is not supported"):
        load_package(bad)


def test_manifest_schema_is_checked_even_with_a_matching_digest(tiny_package, tmp_path):
    import shutil
    from quant.package import load_package, write_manifest
    for sec, key, val, words in (("model_config", "rms_norm_eps", 1e5, "rms_norm_eps"),
                                 ("model_config", "num_hidden_layers", True, "num_hidden_layers"),
                                 ("recipe", "window", True, "window takes an integer")):
        bad = tmp_path / f"bad-{key}"
        shutil.copytree(tiny_package, bad)
        man = json.loads((bad / "manifest.json").read_text())
        man[sec][key] = val
        write_manifest(bad, man)
        with pytest.raises(AccllmError, match=words):
            load_package(bad)
    load_package(tiny_package)
