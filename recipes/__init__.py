"""Recipes: plain functions returning a typed RunConfig, named for what they run.

    from recipes import get_recipe
    config = get_recipe("tiny", ["schedule.steps=2"])
"""
from tropd_megatron.run_config import RunConfig, apply_overrides

from .llama3_70b_to_8b import llama3_70b_to_8b
from .qwen3_8b_to_1p7b import qwen3_8b_to_1p7b
from .tiny import tiny

RECIPES = {"tiny": tiny, "llama3_70b_to_8b": llama3_70b_to_8b, "qwen3_8b_to_1p7b": qwen3_8b_to_1p7b}


def get_recipe(name: str, overrides: list[str] = ()) -> RunConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    return apply_overrides(RECIPES[name](), list(overrides))


__all__ = ["RECIPES", "get_recipe"]
