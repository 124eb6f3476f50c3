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


def add_progress_args(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
