"""Evaluation tasks: a data file on local disk read as one kind (``vlmforge.eval.kinds``).

Formats (chosen by extension, see ``readers``):

- ``.jsonl``: one JSON object per line (fields: each kind's module);
- ``.parquet``: the same fields as columns (images as bytes, ``{"bytes": ..., "path": ...}`` structs
  as Hugging Face datasets write them, or paths);
- ``.tsv``: VLMEvalKit's layout: ``index``, ``question``, ``hint``, option columns ``A``..``Z``,
  ``answer``, ``category``, and ``image`` holding base64 (or, for a repeated image, the ``index`` of
  the row that holds it; or a list of base64 strings) or ``image_path``. Rows whose ``index`` is
  >= 1e6 are MMBench's circular copies and are grouped by ``index % 1e6``.

``image`` may also be ``images``: a list, for multi-image items; relative image paths are resolved
against the task's ``image_root``, default the file's folder. A bad row is an error naming
``file:line`` (``strict=True``) or is skipped and counted by reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vlmforge.eval.asking import read_questions
from vlmforge.eval.items import EvalItem, TaskError
from vlmforge.eval.kind import Kind
from vlmforge.eval.kinds import get_kind
from vlmforge.eval.specs import TaskSpec, check_kind


@dataclass
class Task:
    name: str
    kind: str
    path: str
    items: list[EvalItem]
    scorer: Kind  # the kind's rules: prompts, scoring, metrics
    skipped: dict[str, int] = field(default_factory=dict)
    support_items: list[EvalItem] | None = None


def load_items(
    path: str | os.PathLike, kind: str, image_root: str | os.PathLike | None = None, strict: bool = True,
    allow_absolute_paths: bool = False,
) -> tuple[list[EvalItem], dict[str, int]]:
    """All valid items of a task file, and skipped-row counts by reason (non-strict mode).

    Image paths must resolve inside the image root (symlinks resolved), else the row is a
    ``path_outside_root`` error; ``allow_absolute_paths`` accepts absolute ones."""
    read = read_questions(path, kind, image_root, strict=strict, allow_absolute_paths=allow_absolute_paths)
    return read.items, read.skipped


def limit_questions(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """The first ``limit`` questions (all rotations of a circular question count as one)."""
    if limit is None:
        return items
    keep, out = [], []
    for it in items:
        g = it.group if it.group is not None else it.id
        if g not in keep:
            if len(keep) >= limit:
                continue
            keep.append(g)
        out.append(it)
    return out


def load_task(spec: TaskSpec, limit: int | None = None, strict: bool = True,
              allow_absolute_paths: bool = False) -> Task:
    check_kind(spec.kind, f"task {spec.name!r}")
    items, skipped = load_items(spec.path, spec.kind, spec.image_root, strict, allow_absolute_paths)
    scorer = get_kind(spec.kind)
    items = scorer.prepare(limit_questions(items, limit))
    if not items:
        raise TaskError(f"task {spec.name!r}: {spec.path} has no usable rows" + (f" (skipped: {skipped})" if skipped else ""))
    support = None
    if spec.support:
        support, _ = load_items(spec.support, spec.kind, spec.image_root, strict, allow_absolute_paths)
    return Task(name=spec.name, kind=spec.kind, path=str(spec.path), items=items, scorer=scorer,
                skipped=skipped, support_items=support)
