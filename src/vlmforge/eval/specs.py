"""Task specs: which file, read as which kind, under which name.

``--tasks`` (comma separated) takes ``KIND:PATH``, ``NAME=KIND:PATH``, a YAML task file (``*.yaml``:
a list of ``{name, kind, path, image_root?, support?}``, paths relative to the YAML), or a built-in
name of the synthetic world (``synth-mcq``, ``synth-vqa``, ``synth-pope``, ``synth-math``,
``synth-multi`` (two images per question, multiple choice), and ``synth`` for the short-answer
three: mcq, vqa, pope): ``SYNTH_DIR/eval/{mcq,vqa,pope,math,multi}.jsonl``
as ``vlmforge synth`` writes them (their extra ``prompt`` field is ignored: prompts are built from
the kind, in the same format). ``synth-math`` is asked for worked solutions, which need far more
new tokens than a one-word answer, so it is named on its own rather than joining ``synth``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlmforge.eval.items import TaskError
from vlmforge.eval.kinds import KINDS

BUILTIN_SYNTH = {"synth-mcq": ("mmbench", "mcq.jsonl"), "synth-vqa": ("vqa", "vqa.jsonl"),
                 "synth-pope": ("pope", "pope.jsonl"), "synth-math": ("math", "math.jsonl"),
                 "synth-multi": ("mcq", "multi.jsonl")}
SYNTH_GROUP = ("synth-mcq", "synth-vqa", "synth-pope")  # what ``synth`` names
# the synth setting that writes a built-in task's file, for the message when it is missing
SYNTH_COUNTS = {"synth-math": "synth.num_math", "synth-multi": "synth.num_multi"}


@dataclass
class TaskSpec:
    name: str
    kind: str
    path: str
    image_root: str | None = None
    support: str | None = None  # k-shot demonstrations from this file (same kind); default: the task itself


def check_kind(kind: str, where: str) -> None:
    if kind not in KINDS:
        raise TaskError(f"{where}: unknown task kind {kind!r} (known: {', '.join(KINDS)})")


def parse_task_specs(tasks: str | list, synth_dir: str | os.PathLike | None = None) -> list[TaskSpec]:
    """Turn ``--tasks`` text (or a list of strings / TaskSpecs) into TaskSpecs."""
    parts = [p.strip() for p in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    specs: list[TaskSpec] = []
    for part in parts:
        if isinstance(part, TaskSpec):
            specs.append(part)
        elif not part:
            continue
        elif part == "synth" or part in BUILTIN_SYNTH:
            specs += _synth_specs(part, synth_dir)
        elif part.endswith((".yaml", ".yml")) and ":" not in part.split("=", 1)[-1]:
            specs += _yaml_specs(Path(part))
        else:
            name, _, rest = part.rpartition("=")
            kind, sep, path = rest.partition(":")
            if not sep or not path:
                raise TaskError(
                    f"task {part!r}: expected KIND:PATH, NAME=KIND:PATH, a .yaml task file or a built-in "
                    f"name ({', '.join(['synth', *BUILTIN_SYNTH])})"
                )
            check_kind(kind, part)
            specs.append(TaskSpec(name=name or f"{kind}:{Path(path).stem}", kind=kind, path=path))
    names = Counter(s.name for s in specs)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise TaskError(f"task names must be unique; repeated: {', '.join(dup)} (use NAME=KIND:PATH)")
    return specs


def _synth_specs(name: str, synth_dir) -> list[TaskSpec]:
    if synth_dir is None:
        raise TaskError(f"task {name!r} is a built-in synthetic-world task: give --synth-dir (the `vlmforge synth` output)")
    root = Path(synth_dir)
    wanted = {n: BUILTIN_SYNTH[n] for n in (SYNTH_GROUP if name == "synth" else (name,))}
    specs = []
    for task_name, (kind, filename) in wanted.items():
        path = root / "eval" / filename
        if not path.is_file():
            if name == "synth":
                continue  # "synth" = whichever benchmarks the world has
            how = f"; it is written when {SYNTH_COUNTS[task_name]} > 0" if task_name in SYNTH_COUNTS else ""
            raise TaskError(f"task {task_name!r}: {path} not found (is {root} a `vlmforge synth` output folder?{how})")
        if task_name in SYNTH_COUNTS and path.stat().st_size == 0:
            setting = SYNTH_COUNTS[task_name]
            raise TaskError(f"task {task_name!r}: {path} is empty (the world was made with {setting}=0)")
        # `vlmforge synth` writes image paths relative to the jsonl's folder (the default root).
        specs.append(TaskSpec(name=task_name, kind=kind, path=str(path)))
    if not specs:
        raise TaskError(f"task 'synth': no eval files under {root / 'eval'}")
    return specs


def _relative_to(base: Path, p) -> str | None:
    return None if p is None else str(p if os.path.isabs(p) else base / p)


def _yaml_specs(path: Path) -> list[TaskSpec]:
    if not path.is_file():
        raise TaskError(f"task file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: cannot parse YAML: {e}") from None
    if isinstance(data, dict):
        data = data.get("tasks")
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected a list of tasks (or a mapping with a 'tasks' list)")
    specs = []
    for i, entry in enumerate(data):
        where = f"{path}: task #{i + 1}"
        if not isinstance(entry, dict) or "kind" not in entry or "path" not in entry:
            raise TaskError(f"{where}: each task needs at least 'kind' and 'path'")
        unknown = set(entry) - {"name", "kind", "path", "image_root", "support"}
        if unknown:
            raise TaskError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        check_kind(entry["kind"], where)
        specs.append(TaskSpec(
            name=entry.get("name") or f"{entry['kind']}:{Path(entry['path']).stem}",
            kind=entry["kind"], path=_relative_to(path.parent, entry["path"]),
            image_root=_relative_to(path.parent, entry.get("image_root")),
            support=_relative_to(path.parent, entry.get("support")),
        ))
    return specs
