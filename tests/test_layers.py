"""Imports follow the layer order in tests/layers.py: no import upwards or sideways, no cycle, no
private names across modules, function-level imports only in command modules or for optional extras."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from layers import LAYERS, check, module_sources

SRC = Path(__file__).resolve().parents[1] / "src"


def _tree(tmp_path: Path, files: dict[str, str]) -> dict:
    for rel, text in files.items():
        p = tmp_path / "vlmforge" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return module_sources(tmp_path)


def test_vlmforge_follows_the_layer_order():
    problems = check(module_sources(SRC))
    assert not problems, "\n".join(map(str, problems))


def test_every_package_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in (SRC / "vlmforge").iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))}
    units.discard("__init__")
    layered = {u for layer in LAYERS for u in layer}
    assert units <= layered, f"not in any layer: {sorted(units - layered)}"


BASE = {"__init__.py": "", "errors.py": "class UserError(Exception): ...\n",
        "shards.py": "from vlmforge.errors import UserError\n",
        "train/__init__.py": "", "train/loop.py": "from vlmforge import shards\n"}


def test_checker_accepts_a_clean_tree(tmp_path):
    assert check(_tree(tmp_path, BASE)) == []


@pytest.mark.parametrize("rel, text, expect", [
    ("shards.py", "from vlmforge.train.loop import x\n", "not in a lower layer"),  # upwards
    ("errors.py", "import vlmforge.shards\n", "not in a lower layer"),
    ("config/__init__.py", "from vlmforge.files import x\n", "not in a lower layer"),  # sideways, same layer
    ("train/loop.py", "from vlmforge.shards import _private\n", "private name _private"),
    ("train/loop.py", "def f():\n    from vlmforge import shards\n", "inside a function"),
    ("train/loop.py", "def f():\n    import numpy\n", "inside a function"),
    ("nowhere.py", "x = 1\n", "in no layer"),
])
def test_checker_catches(tmp_path, rel, text, expect):
    files = dict(BASE)
    files.setdefault("config/__init__.py", "")
    files.setdefault("files.py", "x = 1\n")
    files[rel] = files.get(rel, "") + text
    problems = [str(p) for p in check(_tree(tmp_path, files))]
    assert any(expect in p for p in problems), problems


def test_checker_allows_commands_and_extras_to_import_late(tmp_path):
    files = dict(BASE)
    files["train/command.py"] = "def run():\n    from vlmforge.train import loop\n"
    files["train/fused.py"] = "def f():\n    import flash_attn\n"
    files["train/guarded.py"] = "try:\n    import flash_attn\nexcept ImportError:\n    flash_attn = None\n"
    assert check(_tree(tmp_path, files)) == []


def test_checker_finds_cycles_inside_a_package(tmp_path):
    files = dict(BASE)
    files["train/a.py"] = "from vlmforge.train import b\n"
    files["train/b.py"] = "from vlmforge.train.a import x\n"
    problems = [str(p) for p in check(_tree(tmp_path, files))]
    assert any("import cycle" in p and "vlmforge.train.a" in p for p in problems), problems
