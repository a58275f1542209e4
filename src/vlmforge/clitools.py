"""Arguments shared by stage commands (recipe + overrides)."""

from __future__ import annotations

import argparse
import os

from vlmforge.config import load_recipe
from vlmforge.errors import UserError


def add_recipe_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--recipe",
        default=default,
        help="recipe YAML file or built-in name (see `vlmforge recipes`)"
        + (f"; default {default}" if default else ""),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe field, e.g. --set train.lr=2e-5 (repeatable)",
    )


def recipe_from_args(args: argparse.Namespace):
    return load_recipe(args.recipe, args.overrides)


def input_files(from_flag: list[str] | None, from_recipe: list[str], recipe_key: str, what: str) -> list[str]:
    """An index command's input files: ``--input`` if given, else the recipe's list; each must exist
    (a UserError naming the flag or key otherwise)."""
    sources = list(from_flag or from_recipe)
    key = "--input" if from_flag else recipe_key
    if not sources:
        raise UserError(f"no input files: pass --input FILE... (or set {recipe_key} in the recipe)")
    for src in sources:
        if not os.path.isfile(src):
            raise UserError(f"{key} {src}: no such file ({what})")
    return sources


def image_root_arg(from_flag: str | None, from_recipe: str | None, recipe_key: str) -> str | None:
    """``--image-root`` if given, else the recipe's; it must be a folder when set."""
    root = from_flag or from_recipe
    if root and not os.path.isdir(root):
        key = "--image-root" if from_flag else recipe_key
        raise UserError(f"{key} {root}: no such folder (the folder the rows' image paths are relative to)")
    return root
