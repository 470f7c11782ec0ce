"""Recipes: plain functions returning a typed RunConfig, named for what they run.

    from recipes import get_recipe
    config = get_recipe("tiny", ["schedule.steps=2"])
    config = get_recipe("my_pkg.my_recipes:my_run")        # a recipe of your own, importable
    config = get_recipe("configs/my_recipes.py:my_run")    # or a Python file and a function in it
"""
import argparse
import importlib
import importlib.util
import os
import sys

from tropd_megatron.run_config import RunConfig, apply_overrides

from .llama3_70b_to_8b import llama3_70b_to_8b
from .qwen3_8b_to_1p7b import qwen3_8b_to_1p7b
from .smollm2_prune_distill import smollm2_prune_distill
from .tiny import tiny
from tropd_megatron import ConfigError

RECIPES = {"tiny": tiny, "llama3_70b_to_8b": llama3_70b_to_8b, "qwen3_8b_to_1p7b": qwen3_8b_to_1p7b,
           "smollm2_prune_distill": smollm2_prune_distill}
RECIPE_HELP = f"one of {', '.join(sorted(RECIPES))}, or your own: package.module:function or path/to/file.py:function"


def _module(source: str, spec: str):
    """The module a ``source:function`` recipe names: a .py file (relative to the working
    directory) or a dotted module on the Python path."""
    if source.endswith(".py"):
        path = os.path.abspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"recipe {spec!r}: no such file {path}")
        name = "_tropd_recipe_" + "".join(c if c.isalnum() else "_" for c in path)
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module  # dataclasses defined in the file look their module up here
        loader.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        raise ConfigError(f"recipe {spec!r}: cannot import {e.name!r} (is its folder on PYTHONPATH? "
                         "or name a file: path/to/file.py:function)") from None


def load_recipe(spec: str):
    """The recipe function ``spec`` names: a built-in name, ``package.module:function`` or
    ``path/to/file.py:function``."""
    if spec in RECIPES:
        return RECIPES[spec]
    if ":" not in spec:
        raise ConfigError(f"unknown recipe {spec!r}; available: {', '.join(sorted(RECIPES))} "
                         "(or your own: package.module:function, path/to/file.py:function)")
    source, _, function = spec.rpartition(":")
    module = _module(source, spec)
    recipe = getattr(module, function, None)
    if not callable(recipe):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"recipe {spec!r}: {source} has no function {function!r}"
                         + (f" (its functions: {', '.join(found)})" if found else ""))
    return recipe


def absolute_spec(spec: str) -> str:
    """``spec`` with a recipe file's path made absolute, for a job that starts in another folder."""
    source, _, function = spec.rpartition(":")
    return f"{os.path.abspath(source)}:{function}" if source.endswith(".py") else spec


def get_recipe(spec: str, overrides: list[str] = ()) -> RunConfig:
    """The RunConfig of recipe ``spec`` (see ``load_recipe``) with dotted ``key=value`` overrides."""
    config = load_recipe(spec)()
    if not isinstance(config, RunConfig):
        raise ConfigError(f"recipe {spec!r} returned {type(config).__name__}, not a RunConfig")
    return apply_overrides(config, list(overrides))


def recipe_parser(description: str) -> argparse.ArgumentParser:
    """The launchers' shared command line: ``--recipe NAME`` and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help=RECIPE_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def parse_recipe_args(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, RunConfig]:
    """(arguments, the recipe with its overrides); a bad recipe or override exits 2 with the message."""
    args = parser.parse_args(argv)
    try:
        return args, get_recipe(args.recipe, args.overrides)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


__all__ = ["RECIPES", "absolute_spec", "get_recipe", "load_recipe", "parse_recipe_args", "recipe_parser"]
