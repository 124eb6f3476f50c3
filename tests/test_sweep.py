"""``accllm sweep``: a 2 x 2 grid on tiny on a local 2-worker Ray and in-process (--local) gives the same
points; bad grid keys and values are refused in one line before any work; a failed point is reported and
the others complete; cached packages are not compiled again. Each run has its own cache folder (the
converted tokenizer of the real cache is linked in)."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# cheap compilation: no pruning, no block-wise reconstruction, two short calibration windows
FAST = ["--set", "sparsity=none", "--set", "block_tune_steps=0", "--set", "calib_samples=2",
        "--set", "calib_seqlen=64"]
BASE = ["sweep", "--model", "tiny", "--hw", "sim-small", *FAST, "--ctx", "32", "--chunks", "2", "--no-progress"]
GRID = ["--grid", "weight_bits=2,4", "--grid", "window=8,16"]
METRICS = ("bits_per_weight", "bytes_per_token", "decode_tokens_per_s", "prefill_tokens_per_s", "ppl")
RUN_DEPENDENT = ("seconds", "compile_seconds", "eval_seconds", "compiled", "package")


def _cache(root: Path) -> Path:
    """A fresh XDG cache folder whose models/ is the real one (the tiny model's tokenizer is converted there)."""
    from algo.common import cache_dir
    from algo.models import smollm2_tokenizer
    smollm2_tokenizer()                                   # converted once into the real cache
    (root / "accllm").mkdir(parents=True)
    (root / "accllm" / "models").symlink_to(cache_dir("models"))
    return root


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ACCLLM_CACHE", "RAY_ADDRESS")}
    env.update(XDG_CACHE_HOME=str(cache), PYTHONPATH=str(REPO))
    return env


def _cli(args, cache: Path):
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True,
                          env=_env(cache), cwd=REPO, timeout=300)


def _same(p: dict) -> dict:
    return {k: v for k, v in p.items() if k not in RUN_DEPENDENT}


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    """The 2 x 2 grid on a local Ray of two workers, as a subprocess: (its JSON document, --out, cache)."""
    cache = _cache(tmp_path_factory.mktemp("cache"))
    out = tmp_path_factory.mktemp("ray-out")
    r = _cli(BASE + GRID + ["--workers", "2", "--json", "--out", str(out)], cache)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), out, cache               # the whole stdout is the one JSON document


@pytest.fixture(scope="module")
def local_run(ray_run, tmp_path_factory):
    """The same grid with --local in this process, on the Ray run's cache (its results.json)."""
    from host import cli
    out = tmp_path_factory.mktemp("local-out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(ray_run[2]))
        mp.delenv("ACCLLM_CACHE", raising=False)
        assert cli.main(BASE + GRID + ["--local", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture()
def in_process(ray_run, monkeypatch, capsys):
    """``accllm ARGS`` in this process on the Ray run's cache: (exit status, JSON or stdout, stderr)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(ray_run[2]))
    monkeypatch.delenv("ACCLLM_CACHE", raising=False)
    from host import cli

    def run(args):
        capsys.readouterr()
        rc = cli.main(args)
        cap = capsys.readouterr()
        return rc, (json.loads(cap.out) if "--json" in args else cap.out), cap.err
    return run


def test_ray_and_local_give_the_same_points(ray_run, local_run):
    doc, out, _ = ray_run
    assert doc["mode"] == "ray-local" and doc["workers"] == 2 and local_run["mode"] == "local"
    assert [(p["weight_bits"], p["window"]) for p in doc["points"]] == [(2, 8), (2, 16), (4, 8), (4, 16)]
    assert doc["grid"] == {"weight_bits": [2, 4], "window": [8, 16]}
    for p in doc["points"] + local_run["points"]:
        assert "error" not in p, p
        assert p["recipe"] == "accllm" and p["hw"] == "sim-small"
        assert all(isinstance(p[k], (int, float)) and p[k] > 0 for k in METRICS)
    assert [_same(p) for p in doc["points"]] == [_same(p) for p in local_run["points"]]
    bits = {p["weight_bits"]: p["bits_per_weight"] for p in doc["points"]}
    assert 2 < bits[2] < 2.5 < 4 < bits[4] < 4.5          # codes + zero points + scales of 64-weight groups
    kept = {p["window"]: p["bytes_per_token"] for p in doc["points"] if p["weight_bits"] == 2}
    assert kept[16] > kept[8]                             # more KV read per token with the larger window
    assert any(p["pareto"] for p in doc["points"])
    # --out: the same document, a CSV row per point, the plot
    assert json.loads((out / "results.json").read_text())["points"] == doc["points"]
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("weight_bits,window,recipe,hw,")
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_compiles_nothing(ray_run, local_run):
    assert [p["compiled"] for p in ray_run[0]["points"]] == [True] * 4 and ray_run[0]["compiled"] == 4
    assert [p["compiled"] for p in local_run["points"]] == [False] * 4 and local_run["compiled"] == 0
    assert [p["package"] for p in local_run["points"]] == [p["package"] for p in ray_run[0]["points"]]
    assert "ray" not in sys.modules                       # imported only for a Ray run


def test_failed_points_are_reported_and_the_others_complete(local_run, in_process, monkeypatch):
    # S + W = 4 + 16 slots exceed max_context 16: refused when the point compiles; 2048 is sim-small's own
    # (the configuration of the runs above: the package is in the cache)
    rc, doc, err = in_process(BASE + ["--grid", "weight_bits=2", "--grid", "window=16", "--grid",
                                      "hw.max_context=16,2048", "--local", "--json"])
    assert rc == 0 and doc["failed"] == 1 and doc["ok"] == 1
    bad, good = doc["points"]
    assert set(bad) == {"weight_bits", "window", "hw.max_context", "recipe", "hw", "error", "seconds"}
    assert "exceed max_context=16" in bad["error"] and bad["hw.max_context"] == 16
    assert good["compiled"] is False and good["hw.max_context"] == 2048
    assert _same(good) == _same({**local_run["points"][1], "hw.max_context": 2048, "pareto": True})

    import host.sweep
    real = host.sweep.evaluate

    def flaky(point):
        if point["settings"]["window"] == 8:
            raise RuntimeError("scorer crashed\nsecond line")
        return real(point)
    monkeypatch.setattr(host.sweep, "evaluate", flaky)
    rc, out, err = in_process(BASE + ["--grid", "weight_bits=2", "--grid", "window=8,16", "--local"])
    assert rc == 0
    rows = [line.split() for line in out.splitlines()[1:3]]
    assert rows[0] == ["2", "8", "error:", "RuntimeError:", "scorer", "crashed"]
    assert rows[1][:2] == ["2", "16"] and rows[1][-2:] == ["*", "cached"]
    assert "1 of 2 point(s) ok, 1 failed" in out and "Traceback" in err and "scorer crashed" in err


def test_every_point_failing_exits_1(in_process):
    rc, doc, _ = in_process(BASE + ["--grid", "window=16,32", "--hw-set", "max_context=16", "--local", "--json"])
    assert rc == 1 and doc["failed"] == 2 and doc["ok"] == 0
    assert all("max_context=16" in p["error"] for p in doc["points"])


@pytest.mark.parametrize("grid, message", [
    (["--grid", "sink=4"], "unknown grid key 'sink' (did you mean sink_tokens?); accepted: recipe keys weight_bits"),
    (["--grid", "weight_bits=2,5"], "grid weight_bits=5: recipe key weight_bits=5 is not accepted; choose one of "
                                    "0, 2, 3, 4, 8"),
    (["--grid", "window=0"], "grid window=0: recipe key window: must be a positive integer, got 0"),
    (["--grid", "hw.clock_mhz=fast"], "grid hw.clock_mhz=fast: hardware key clock_mhz takes a number"),
    (["--grid", "hw.mac_rows=0"], "grid hw.mac_rows=0: hardware key mac_rows must lie in [1, 4096]"),
    (["--grid", "hw.colour=1"], "unknown grid key 'hw.colour'"),
    (["--grid", "hw=u281"], "grid hw=u281: unknown hardware configuration 'u281'; presets: u280, sim-small"),
    (["--grid", "window=8,8"], "grid key window: the value \"8\" is given twice"),
    (["--grid", "window=8", "--grid", "window=16"], "grid key window is given twice"),
    (["--grid", "window"], "--grid takes KEY=V1,V2,..., got 'window'"),
    (["--grid", "weight_bits=2", "--address", "x:1", "--workers", "2"], "--workers sizes the local Ray"),
])
def test_bad_grid_is_refused_in_one_line(grid, message, in_process, tmp_path):
    rc, out, err = in_process(BASE + grid + ["--out", str(tmp_path / "o")])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_grid_file(tmp_path, in_process):
    f = tmp_path / "grid.toml"
    f.write_text('[grid]\nweight_bits = [2, 4]\nhw.clock_mhz = [100, 200.5]\n')
    from host import sweep
    axes = sweep.load_grid_file(str(f))
    assert axes == [("weight_bits", [2, 4]), ("hw.clock_mhz", [100, 200.5])]
    base = sweep.Base(model="tiny", recipe="accllm", hw="sim-small")
    *_, settings = sweep.resolve(base, {"weight_bits": 4, "hw.clock_mhz": 200.5})
    assert settings == {"weight_bits": 4, "hw.clock_mhz": 200.5}
    f.write_text('weight_bits = [2, 4]\n[hw]\nclock_mhz = true\n')
    rc, _, err = in_process(BASE + ["--grid-file", str(f), "--local"])
    assert rc == 2 and "grid hw.clock_mhz=true: hardware key clock_mhz takes a number, got True" in err and err.count("\n") == 1


@contextlib.contextmanager
def socket_free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]                          # bound, not listening: connections are refused


def _weights(points) -> list[str]:
    return [json.loads((Path(p["package"]) / "manifest.json").read_text())["files"]["weights.safetensors"]
            for p in points]


@pytest.mark.slow
def test_local_compiles_the_same_packages_as_ray(ray_run, tmp_path):
    """--local on a fresh cache compiles byte-identical packages (torch on every core, not one thread per
    Ray worker) and the same points."""
    r = _cli(BASE + GRID + ["--local", "--json"], _cache(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["compiled"] == 4
    assert [_same(p) for p in doc["points"]] == [_same(p) for p in ray_run[0]["points"]]
    assert _weights(doc["points"]) == _weights(ray_run[0]["points"])


@pytest.mark.slow
def test_address_joins_a_running_cluster(ray_run, local_run):
    """--address: the points run on a cluster of `ray start --head` (stopped again by its process id)."""
    import signal
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "false"], env=_env(ray_run[2]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "the Ray head did not start"
                time.sleep(1)
        r = _cli(BASE + GRID + ["--address", f"127.0.0.1:{port}", "--json"], ray_run[2])
        assert r.returncode == 0, r.stderr[-3000:]
        doc = json.loads(r.stdout)
        assert doc["mode"] == "ray-cluster" and doc["compiled"] == 0
        assert [_same(p) for p in doc["points"]] == [_same(p) for p in local_run["points"]]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def test_address_nobody_listens_on_is_refused(in_process):
    with socket_free_port() as port:
        rc, _, err = in_process(BASE + ["--grid", "window=8", "--address", f"127.0.0.1:{port}"])
    assert rc == 2 and "no Ray cluster answers there" in err and err.count("\n") == 1
