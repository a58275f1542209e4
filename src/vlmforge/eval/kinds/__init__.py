"""The evaluation kinds, one module each; the registry is read from this folder.

Every module here defines ``KIND``, a ``vlmforge.eval.kind.Kind`` subclass that parses its rows,
builds its prompt, scores and aggregates. ``KINDS`` maps each kind's name (and aliases) to it, so
adding a kind is adding a module (and its test): nothing else names the kinds.
"""

from __future__ import annotations

import sys

from vlmforge.eval.kind import Kind
from vlmforge.plugins import discover


def _by_name(classes: list[type[Kind]]) -> dict[str, type[Kind]]:
    found: dict[str, type[Kind]] = {}
    for cls in classes:
        if not cls.name:
            raise TypeError(f"{cls.__module__}.{cls.__name__} has no name")
        for name in (cls.name, *cls.aliases):
            if name in found:
                raise TypeError(f"{cls.__module__}: kind name {name!r} is also {found[name].__module__}'s")
            found[name] = cls
    return found


KINDS: dict[str, type[Kind]] = _by_name(discover(sys.modules[__name__], "KIND", Kind))


def get_kind(kind: str, **options) -> Kind:
    """The rules of task kind ``kind`` (options go to its constructor, e.g. ``official_skip_unanimous``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r} (known: {', '.join(KINDS)})")
    return KINDS[kind](**options)

