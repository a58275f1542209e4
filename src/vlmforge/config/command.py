"""List the built-in recipes, or print one fully resolved (defaults + base + overrides)."""

from __future__ import annotations

import argparse

HELP = "list built-in recipes or print a resolved recipe"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="recipe to resolve and print (file or built-in name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    from vlmforge.config import load_recipe, to_yaml
    from vlmforge.config.loader import BUILTIN_DIR

    if args.name is None:
        for p in sorted(BUILTIN_DIR.rglob("*.yaml")):
            print(str(p.relative_to(BUILTIN_DIR))[: -len(".yaml")])
        return 0
    print(to_yaml(load_recipe(args.name, args.overrides)), end="")
    return 0
