"""Arguments shared by stage commands (recipe + overrides)."""

from __future__ import annotations

import argparse

from vlmforge.config import load_recipe


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
