"""Smoke test: the RTL toolchain is really there (Amaranth → Verilog → cocotb on both simulators); and
sim.toolchain.run_cocotb fails a run whose results show no test ran, or are missing or empty."""
from pathlib import Path

import pytest

from algo.common import AccllmError
from hw.smoke import export
from sim.toolchain import run_cocotb

TB = Path(__file__).resolve().parents[1] / "sim" / "tb" / "smoke"


@pytest.mark.parametrize("simulator", ["verilator", "icarus"])
def test_amaranth_to_cocotb(simulator, tmp_path):
    v = tmp_path / "stream_acc.v"
    export(v)
    text = v.read_text()
    assert "module stream_acc" in text
    run_cocotb(simulator=simulator, toplevel="stream_acc", sources=[v], test_module="test_stream_acc",
               test_dir=TB, name="smoke", results_dir=tmp_path)


# ---- reading the results XML (no simulator needed) -------------------------------------------------
# what cocotb 2.x writes (cocotb._xunit_reporter): one testsuite per test module, a skipped / failure /
# error element inside a test case that did not pass; no test at all is an empty <testsuites/>
def _xml(*cases):
    body = "".join(f'<testcase classname="test_m" name="{n}" time="0.1">{inner}<properties /></testcase>'
                   for n, inner in cases)
    suite = f'<testsuite name="test_m" tests="{len(cases)}">{body}</testsuite>' if cases else ""
    return f"<?xml version='1.0' encoding='utf-8'?>\n<testsuites name=\"cocotb tests\">{suite}</testsuites>"


ZERO_TESTS = "<?xml version='1.0' encoding='utf-8'?>\n<testsuites name=\"cocotb tests\" />"


def test_check_results_counts_passed_and_failed(tmp_path):
    from sim.toolchain import check_results
    f = tmp_path / "r.xml"
    f.write_text(_xml(("a", ""), ("b", '<failure message="bad" />'), ("c", '<error message="init" />'),
                      ("d", '<skipped message="x" />')))
    assert check_results(f, "t") == (3, 2)
    assert check_results(f, "t", ["a", "b"]) == (3, 2)


@pytest.mark.parametrize("text, words", [
    (ZERO_TESTS, "no cocotb test ran"),
    (_xml(), "no cocotb test ran"),
    (_xml(("a", '<skipped message="x" />')), "no cocotb test ran"),
    ("", "is empty"),
    ("<testsuites", "not valid XML"),
], ids=["no-testsuite", "empty-testsuites", "all-skipped", "empty-file", "truncated"])
def test_check_results_refuses_a_run_that_checked_nothing(tmp_path, text, words):
    from sim.toolchain import check_results
    f = tmp_path / "r.xml"
    f.write_text(text)
    with pytest.raises(AccllmError, match=words):
        check_results(f, "t")


def test_check_results_missing_file_and_missing_testcase(tmp_path):
    from sim.toolchain import check_results
    with pytest.raises(AccllmError, match="no cocotb results file"):
        check_results(tmp_path / "absent.xml", "t")
    f = tmp_path / "r.xml"
    f.write_text(_xml(("matmul_dense", "")))
    with pytest.raises(AccllmError, match="did not run .*: matmul_sparse; ran: matmul_dense"):
        check_results(f, "t", ["matmul_dense", "matmul_sparse"])


class _FakeRunner:
    """Stands in for a cocotb_tools runner: test() writes *xml* (None: nothing) and exits with *code*."""
    def __init__(self, xml, code=None):
        self.xml, self.code = xml, code

    def test(self, *, results_xml, **kw):
        if self.xml is not None:
            Path(results_xml).write_text(self.xml)
        if self.code is not None:
            raise SystemExit(self.code)
        return Path(results_xml)


def _run_fake(monkeypatch, tmp_path, runner, testcase=None):
    import sim.toolchain as tc
    monkeypatch.setattr(tc, "build_design", lambda *a, **k: (runner, tmp_path / "build"))
    return tc.run_cocotb(simulator="verilator", toplevel="top", sources=[], test_module="test_m", test_dir=tmp_path,
                         name="fake", results_dir=tmp_path, testcase=testcase)


@pytest.mark.parametrize("xml, code, words", [
    (ZERO_TESTS, None, "no cocotb test ran"),
    (None, None, "no cocotb results file"),
    (None, 0, "no cocotb results file"),          # cocotb's runner under pytest: sys.exit(0) without results
    ("", None, "is empty"),
    (_xml(("a", '<failure message="bad" />')), 1, "1 of 1 cocotb tests failed"),
    (_xml(("a", "")), 3, "simulator exited with status 3"),
], ids=["zero-tests", "no-file", "no-file-exit-0", "empty-file", "a-failure", "simulator-error"])
def test_run_cocotb_fails_unless_tests_ran_and_passed(monkeypatch, tmp_path, xml, code, words):
    with pytest.raises(AccllmError, match=words):
        _run_fake(monkeypatch, tmp_path, _FakeRunner(xml, code))


def test_run_cocotb_passes_and_checks_the_testcases_asked_for(monkeypatch, tmp_path):
    runner = _FakeRunner(_xml(("a", ""), ("b", "")))
    assert _run_fake(monkeypatch, tmp_path, runner) == tmp_path / "results-test_m.xml"
    assert _run_fake(monkeypatch, tmp_path, runner, testcase="a, b").is_file()
    with pytest.raises(AccllmError, match="did not run .*: c;"):
        _run_fake(monkeypatch, tmp_path, runner, testcase="a,c")


@pytest.mark.parametrize("xml, code, rc, words", [
    (_xml(("serve", "")), None, 0, ""),
    (ZERO_TESTS, None, 1, "no cocotb test ran"),
    (_xml(("serve", '<failure message="bad" />')), 1, 1, "1 of 1 cocotb tests failed"),
    (_xml(("serve", '<error message="import" />')), None, 1, "1 of 1 cocotb tests failed"),
    (None, 0, 1, "no cocotb results file"),
    (_xml(("other", "")), None, 1, "did not run .*: serve"),
], ids=["passed", "zero-tests", "failed", "errored", "no-results", "serve-not-run"])
def test_rtl_backend_launcher_checks_the_server_run(monkeypatch, tmp_path, capsys, xml, code, rc, words):
    """sim/rtlsim/launch.py (the rtl backend's simulator process) exits 1 with one clear line when the
    device-server test failed or did not run, through the same checks as run_cocotb."""
    import re
    import sim.toolchain as tc
    from sim.rtlsim import launch
    monkeypatch.setattr(tc, "build_design", lambda *a, **k: (_FakeRunner(xml, code), tmp_path / "build"))
    (tmp_path / "rtl").mkdir()
    (tmp_path / "rtl" / "k.v").write_text("module k; endmodule\n")
    assert launch.main(["--sock", str(tmp_path / "sock"), "--rtl", str(tmp_path / "rtl"), "--mem", "cocotb"]) == rc
    err = capsys.readouterr().err
    if rc:
        assert re.search(words, err) and err.count("\n") == 1, err
    else:
        assert err == ""
