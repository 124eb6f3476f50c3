"""``accllm disasm``: readable listing of a program.bin (hw/isa.py)."""
from __future__ import annotations

import json
from pathlib import Path

from algo.common import AccllmError

DESCRIPTION = """Disassemble accelerator instruction words (128-bit, hw/isa.py) into a listing:
index, raw word, mnemonic and operands. Given a program.bin inside a compiled package, the entry
points of memmap.json are shown as labels. Illegal words are listed as <illegal: reason>."""
EPILOG = "example: accllm disasm build/tiny/program.bin"


def add_arguments(p) -> None:
    p.add_argument("program", help="program.bin (or a package directory holding one)")
    p.add_argument("--json", action="store_true", help="one JSON object (the instructions as a list, "
                   "with their entry-point labels) instead of text")


def run(args) -> int:
    from hw import isa
    path = Path(args.program)
    if path.is_dir():
        path = path / "program.bin"
    if not path.is_file():
        raise AccllmError(f"{path}: no such program file (give program.bin or a compiled package directory)")
    data = path.read_bytes()
    if not data:
        raise AccllmError(f"{path} is empty")
    isa.split_words(data, str(path))            # truncated file -> clear error
    labels = {}
    mmf = path.parent / "memmap.json"
    if mmf.is_file():
        try:
            m = json.loads(mmf.read_text())
            labels[int(m["entries"]["decode"]["offset"])] = "decode"
            for e in m["entries"]["prefill"]:
                labels[int(e["offset"])] = f"prefill{e['tokens']}"
        except (KeyError, ValueError, TypeError):
            pass
    if args.json:
        from host.args import emit_json
        listing = []
        for i, w in enumerate(isa.split_words(data)):
            try:
                ins = isa.decode(w, i)
                listing.append({"index": i, "op": ins.name, "flags": ins.flags, "a": ins.a, "b": ins.b,
                                "c": ins.c, "d": ins.d})
            except isa.DecodeError as e:
                listing.append({"index": i, "illegal": str(e)})
            if i in labels:
                listing[-1]["label"] = labels[i]
        emit_json(args, {"program": str(path), "instructions": listing})
        return 0
    print(isa.disassemble(data, labels=labels))
    return 0
