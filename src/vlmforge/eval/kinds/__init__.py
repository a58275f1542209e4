"""The evaluation kinds, one module each; the registry is read from this folder.

Every module here defines ``KIND``, a ``vlmforge.eval.kind.Kind`` subclass that parses its rows,
builds its prompt, scores and aggregates. ``KINDS`` maps each kind's name (and aliases) to it, so
adding a kind is adding a module (and its test): nothing else names the kinds.
"""

from __future__ import annotations

import importlib
import pkgutil

from vlmforge.eval.kind import Kind


def _discover() -> dict[str, type[Kind]]:
    found: dict[str, type[Kind]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        cls = getattr(module, "KIND", None)
        if not (isinstance(cls, type) and issubclass(cls, Kind) and cls.name):
            raise TypeError(f"{module.__name__} defines no KIND (a named vlmforge.eval.kind.Kind subclass)")
        for name in (cls.name, *cls.aliases):
            if name in found:
                raise TypeError(f"{module.__name__}: kind name {name!r} is also {found[name].__module__}'s")
            found[name] = cls
    return found


KINDS: dict[str, type[Kind]] = _discover()


def get_kind(kind: str, **options) -> Kind:
    """The rules of task kind ``kind`` (options go to its constructor, e.g. ``official_skip_unanimous``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r} (known: {', '.join(KINDS)})")
    return KINDS[kind](**options)

