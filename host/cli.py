"""Command-line interface: ``accllm <command>`` and ``compile-model``.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
COMMANDS lists them in the order ``accllm --help`` shows. Errors a user can fix (AccllmError)
print as one line and exit 2; Ctrl-C exits 130. With ``--json`` a command prints exactly one JSON
document on stdout (``host.args.emit_json``) and everything else on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# (name, module, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "host.cmd_demo", "the main job on the embedded default model (what `make demo` runs)"),
    ("eval", "host.cmd_eval", "perplexity of a model, a recipe or a compiled package (WikiText-2, pydoc, pycode or text files)"),
    ("compile", "host.cmd_compile", "compress a model into a package (same as the compile-model command)"),
    ("run", "host.cmd_run", "generate text from a compiled package on a device (emu | rtl | xrt)"),
    ("package-xo", "host.cmd_package_xo", "write the Vitis package_xo Tcl, kernel.xml and HBM connectivity for a card build"),
    ("export", "host.cmd_export", "export a package's weights as GGUF (llama.cpp) or compressed-tensors (transformers/vLLM)"),
    ("disasm", "host.cmd_disasm", "disassemble an accelerator program.bin into a readable listing"),
    ("perf", "host.cmd_perf", "cycle-model projection: bytes/token, decode/prefill tokens/s, HBM roofline (+ PNG)"),
    ("sweep", "host.cmd_sweep", "design-space sweep: a grid of recipe keys and hardware configurations, each point "
              "compiled (cached), projected and scored for perplexity, on Ray or --local (+ CSV, Pareto PNG)"),
    ("bench", "host.cmd_bench", "benchmark a backend (emu: functional-model decode speed)"),
    ("build-rtl", "host.cmd_build_rtl", "export the accelerator RTL: Verilog, kernel.xml, regmap.json (+ yosys resources)"),
]


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("accllm")
    except Exception:
        return "unknown"


def _setup_runtime() -> None:
    # Two cores on CI: keep torch from oversubscribing; respect an explicit setting.
    if "OMP_NUM_THREADS" not in os.environ:
        try:
            import torch
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        except ImportError:
            pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accllm", description="accllm: FPGA/accelerator co-design toolkit for "
                                "long-context LLM inference (model -> compressed package -> program -> device)")
    p.add_argument("--version", action="version", version=f"accllm {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in COMMANDS:
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=help_, description=getattr(mod, "DESCRIPTION", help_),
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=getattr(mod, "EPILOG", None))
        mod.add_arguments(sp)
        sp.set_defaults(_module=mod)
    return p


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every cleanup (temporary directories, simulators) runs
    as it does for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _run(mod, args) -> int:
    import signal
    import threading
    from algo.common import AccllmError
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _setup_runtime()
        if not getattr(args, "json", False):
            return int(mod.run(args) or 0)
        # --json: exactly one JSON document on stdout (host.args.emit_json); whatever else the command
        # writes to stdout -- its prints, libraries, simulators and other child processes -- goes to stderr
        from algo.common import stdout_to_stderr
        args._json_document = None
        with stdout_to_stderr():
            rc = int(mod.run(args) or 0)
        if args._json_document is not None:
            print(args._json_document, flush=True)
        return rc
    except AccllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    return _run(args._module, args)


def compile_model_main(argv: list[str] | None = None) -> int:
    mod = importlib.import_module("host.cmd_compile")
    p = argparse.ArgumentParser(prog="compile-model", description=mod.DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=mod.EPILOG)
    mod.add_arguments(p)
    args = p.parse_args(argv)
    return _run(mod, args)


if __name__ == "__main__":
    sys.exit(main())
