"""Recipes: YAML files validated against dataclass schemas (OmegaConf structured configs).

Each stage owns one section schema (``config/<section>.py``); ``Recipe`` composes them.
"""

from vlmforge.config.loader import (
    load_recipe,
    load_recipe_files,
    recipe_from_dict,
    resolve_recipe_path,
    save_resolved,
    to_yaml,
)
from vlmforge.config.recipe import Recipe

__all__ = [
    "Recipe",
    "load_recipe",
    "load_recipe_files",
    "recipe_from_dict",
    "resolve_recipe_path",
    "save_resolved",
    "to_yaml",
]
