"""Placeholder while the command is being written (replaced by its owner)."""

from __future__ import annotations

HELP = "(being written)"


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise SystemExit("not written yet")
