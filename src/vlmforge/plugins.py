"""Plug-in folders: a registry is the modules of a package, each naming its class in one attribute.

Adding a kind is then adding a module; nothing else lists the kinds.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def discover(package: ModuleType, attr: str, base: type) -> list[type]:
    """The ``attr`` class of every module in ``package`` (sorted by module name); each must subclass ``base``."""
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{module.__name__} defines no {attr} (a {base.__module__}.{base.__name__} subclass)")
        found.append(cls)
    return found
