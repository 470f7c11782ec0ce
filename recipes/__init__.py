"""Recipes: plain functions returning a typed RunConfig, named for what they run.

    from recipes import get_recipe
    config = get_recipe("tiny", ["schedule.steps=2"])
"""
import argparse

from tropd_megatron.run_config import RunConfig, apply_overrides

from .llama3_70b_to_8b import llama3_70b_to_8b
from .qwen3_8b_to_1p7b import qwen3_8b_to_1p7b
from .tiny import tiny

RECIPES = {"tiny": tiny, "llama3_70b_to_8b": llama3_70b_to_8b, "qwen3_8b_to_1p7b": qwen3_8b_to_1p7b}


def get_recipe(name: str, overrides: list[str] = ()) -> RunConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    return apply_overrides(RECIPES[name](), list(overrides))


def recipe_parser(description: str) -> argparse.ArgumentParser:
    """The launchers' shared command line: ``--recipe NAME`` and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help=f"one of: {', '.join(sorted(RECIPES))}")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def parse_recipe_args(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, RunConfig]:
    """(arguments, the recipe with its overrides); a bad recipe or override exits 2 with the message."""
    args = parser.parse_args(argv)
    try:
        return args, get_recipe(args.recipe, args.overrides)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


__all__ = ["RECIPES", "get_recipe", "parse_recipe_args", "recipe_parser"]
