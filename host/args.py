"""Argument groups shared by several commands (model selection and recipes)."""
from __future__ import annotations

from algo.models import DEFAULT_MODEL, NAMES
from algo.recipe import describe_keys, describe_presets, load_recipe


def add_model_args(p, required: bool = False) -> None:
    p.add_argument("--model", default=None if required else DEFAULT_MODEL, required=required,
                   help=f"model: {' | '.join(NAMES)} | HF directory | .gguf file (default {DEFAULT_MODEL})")


def add_recipe_args(p, default: str | None = "fp") -> None:
    p.add_argument("--recipe", default=default, help="named recipe (see below; default %(default)s)")
    p.add_argument("--recipe-file", default=None, metavar="FILE", help="TOML or JSON file of recipe keys, "
                   "applied over the named recipe")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe key (repeatable), applied last")


def recipe_from_args(args):
    return load_recipe(args.recipe, args.recipe_file, args.sets)


RECIPE_EPILOG = f"named recipes:\n{describe_presets()}\n\nrecipe keys (for --set and --recipe-file):\n{describe_keys()}"


def emit_json(args, doc, indent: int | None = None) -> None:
    """The one JSON document of a command run with --json. Under ``accllm`` (host.cli) it is printed
    on standard output after the command returns, everything else the command wrote to standard
    output (its prints, libraries, child processes) having gone to standard error; called directly
    (``mod.run(args)`` in-process) it is printed at once. A second document is a programming error."""
    import json
    import sys
    text = json.dumps(doc, indent=indent)
    if getattr(args, "_json_document", None) is not None:
        raise RuntimeError("a command printed a second --json document")
    deferred = hasattr(args, "_json_document")     # host.cli set it to None: it prints the document
    args._json_document = text
    if not deferred:
        print(text, file=sys.stdout, flush=True)


def add_progress_args(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
