"""Evaluation tasks: a data file on local disk + a scorer kind (+ prompt format from the kind).

Formats (chosen by extension):

- ``.jsonl``: one JSON object per line (schemas below);
- ``.parquet``: the same fields as columns (images as bytes, ``{"bytes": ..., "path": ...}`` structs
  as Hugging Face datasets write them, or paths);
- ``.tsv``: VLMEvalKit's layout: ``index``, ``question``, ``hint``, option columns ``A``..``Z``,
  ``answer``, ``category``, and ``image`` holding base64 (or, for a repeated image, the ``index`` of
  the row that holds it; or a list of base64 strings) or ``image_path``. Rows whose ``index`` is
  >= 1e6 are MMBench's circular copies and are grouped by ``index % 1e6``.

Fields per kind (jsonl / parquet; ``image`` may also be ``images``: a list, for multi-image items;
relative image paths are resolved against the task's ``image_root``, default the file's folder):

- ``mcq`` / ``mmbench``: ``{id, image, question, options: {"A": .., "B": ..} | [..], answer: "B"
  (or the option text), hint?, category?}``; ``mmbench`` scores with CircularEval, generating the
  n rotations itself unless the file already holds them (VLMEvalKit circular TSV);
- ``vqa``: ``{id, image, question, answers: [10 human answers], answer?: canonical, category?}``
  (or only ``answer``: one reference, exact match after normalisation);
  VQAv2-style ``answers: [{"answer": ..}, ..]`` is accepted too;
- ``pope``: ``{id, image, question, answer: "yes"|"no", object?, category? or sampling?}``;
- ``math``: ``{id, image, question, answer, question_type?: multi_choice|free_form, choices?: [..],
  answer_type?: integer|float|text, precision?: int, unit?}`` (MathVista).

A bad row is an error naming ``file:line`` (``strict=True``) or is skipped and counted by reason.

Task specs (``--tasks``, comma separated): ``KIND:PATH``, ``NAME=KIND:PATH``, a YAML task file
(``*.yaml``: a list of ``{name, kind, path, image_root?, support?}``, paths relative to the YAML),
or a built-in name of the synthetic world (``synth-mcq``, ``synth-vqa``, ``synth-pope``, ``synth``
for all of them): ``SYNTH_DIR/eval/{mcq,vqa,pope}.jsonl`` as ``vlmforge synth`` writes them (their
extra ``prompt`` field is ignored: prompts are built from the kind, in the same format).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import hashlib
import io
import json
import os
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vlmforge.eval.scorers import KINDS, make_scorer
from vlmforge.eval.scorers.mcq import rotate_options

CIRCULAR_STRIDE = 1_000_000  # VLMEvalKit: circular copy k of question i has index i + k * 1e6
BUILTIN_SYNTH = {"synth-mcq": ("mmbench", "mcq.jsonl"), "synth-vqa": ("vqa", "vqa.jsonl"),
                 "synth-pope": ("pope", "pope.jsonl"), "synth-math": ("math", "math.jsonl")}


class TaskError(ValueError):
    """A task spec or task file is invalid; the message names the file (and line)."""


class RowError(ValueError):
    """One row is invalid; the loader adds file:line."""


@dataclass(frozen=True)
class ImageRef:
    """An image not yet decoded: a file path, base64 text, or raw bytes."""

    kind: str  # path | base64 | bytes
    value: Any

    def read_bytes(self) -> bytes:
        if self.kind == "path":
            return Path(self.value).read_bytes()
        if self.kind == "base64":
            return base64.b64decode(self.value)
        return self.value

    def load(self):
        from PIL import Image

        img = Image.open(io.BytesIO(self.read_bytes()))
        img.load()
        return img.convert("RGB")

    def key(self) -> str:
        """Identity used to keep a query's own image out of its k-shot demonstrations."""
        if self.kind == "path":
            return "path:" + os.path.abspath(self.value)
        data = self.value.encode() if isinstance(self.value, str) else self.value
        return "sha1:" + hashlib.sha1(data).hexdigest()


@dataclass
class EvalItem:
    id: str
    question: str
    images: list[ImageRef]
    answer: str | None = None  # mcq letter | pope yes/no | math reference
    answers: list[str] | None = None  # vqa human answers
    options: dict[str, str] | None = None  # letter -> text (mcq, math multi_choice)
    hint: str | None = None
    group: str | None = None  # CircularEval: rotations of one question share a group
    meta: dict = field(default_factory=dict)  # category, rotation, answer_type, precision, source, ...


@dataclass
class TaskSpec:
    name: str
    kind: str
    path: str
    image_root: str | None = None
    support: str | None = None  # k-shot demonstrations from this file (same kind); default: the task itself


@dataclass
class Task:
    name: str
    kind: str
    path: str
    items: list[EvalItem]
    scorer: Any
    skipped: dict[str, int] = field(default_factory=dict)
    support_items: list[EvalItem] | None = None

    @property
    def circular(self) -> bool:
        return bool(getattr(self.scorer, "circular", False))


# ----------------------------------------------------------------------------------- specs


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
            _check_kind(kind, part)
            specs.append(TaskSpec(name=name or f"{kind}:{Path(path).stem}", kind=kind, path=path))
    names = Counter(s.name for s in specs)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise TaskError(f"task names must be unique; repeated: {', '.join(dup)} (use NAME=KIND:PATH)")
    return specs


def _check_kind(kind: str, where: str) -> None:
    if kind not in KINDS:
        raise TaskError(f"{where}: unknown task kind {kind!r} (known: {', '.join(KINDS)})")


def _synth_specs(name: str, synth_dir) -> list[TaskSpec]:
    if synth_dir is None:
        raise TaskError(f"task {name!r} is a built-in synthetic-world task: give --synth-dir (the `vlmforge synth` output)")
    root = Path(synth_dir)
    wanted = BUILTIN_SYNTH if name == "synth" else {name: BUILTIN_SYNTH[name]}
    specs = []
    for task_name, (kind, filename) in wanted.items():
        path = root / "eval" / filename
        if not path.is_file():
            if name == "synth":
                continue  # "synth" = whichever benchmarks the world has
            raise TaskError(f"task {task_name!r}: {path} not found (is {root} a `vlmforge synth` output folder?)")
        # `vlmforge synth` writes image paths relative to the jsonl's folder (the default root).
        specs.append(TaskSpec(name=task_name, kind=kind, path=str(path)))
    if not specs:
        raise TaskError(f"task 'synth': no eval files under {root / 'eval'}")
    return specs


def _yaml_specs(path: Path) -> list[TaskSpec]:
    import yaml

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
        _check_kind(entry["kind"], where)

        def rel(p):
            return None if p is None else str(p if os.path.isabs(p) else path.parent / p)

        specs.append(TaskSpec(
            name=entry.get("name") or f"{entry['kind']}:{Path(entry['path']).stem}",
            kind=entry["kind"], path=rel(entry["path"]), image_root=rel(entry.get("image_root")),
            support=rel(entry.get("support")),
        ))
    return specs


# ------------------------------------------------------------------------------- reading


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield (``file:line``, row) for a jsonl, parquet or VLMEvalKit TSV file."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _read_jsonl(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".tsv":
        yield from _read_tsv(path)
    else:
        raise TaskError(f"{path}: unsupported task file type {suffix!r} (use .jsonl, .parquet or .tsv)")


def _read_jsonl(path: Path):
    from vlmforge.files import numbered_lines

    for where, line in numbered_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, RowError(f"invalid JSON ({e.msg})")
            continue
        yield where, row if isinstance(row, dict) else RowError("expected a JSON object")


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _read_tsv(path: Path):
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's 128 KB default
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = []
        for row in reader:
            clean = {k: (None if v == "" else v) for k, v in row.items() if k is not None}
            rows.append((f"{path}:{reader.line_num}", clean))
    # A repeated image is stored once; other rows hold the index of the row that has it.
    by_index = {str(r.get("index")): r.get("image") for _, r in rows}
    for where, row in rows:
        img = row.get("image")
        if isinstance(img, str) and len(img) <= 64 and not img.lower().endswith(_IMAGE_EXT):
            target = by_index.get(img)
            if not target or len(target) <= 64:
                yield where, RowError(f"image refers to row index {img!r}, which holds no image")
                continue
            row["image"] = target
        row["_tsv"] = True
        yield where, row


# ------------------------------------------------------------------------------ row -> item


def _literal(value):
    """Lists/dicts stored as Python literals in TSV cells ("['a', 'b']"); safe, no eval."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _image_refs(row: dict, image_root: Path) -> list[ImageRef]:
    raw = None
    for key in ("images", "image", "image_path"):
        if row.get(key) is not None:
            raw, source = row[key], key
            break
    if raw is None:
        raise RowError("no image (expected 'image', 'images' or 'image_path')")
    raw = _literal(raw)
    values = raw if isinstance(raw, list) else [raw]
    refs = []
    for v in values:
        if isinstance(v, dict):
            v = v.get("bytes") or v.get("path")
        if isinstance(v, (bytes, bytearray)):
            refs.append(ImageRef("bytes", bytes(v)))
        elif isinstance(v, str) and _looks_like_path(v, source, image_root):
            p = Path(v) if os.path.isabs(v) else image_root / v
            if not p.is_file():
                raise RowError(f"image file not found: {p}")
            refs.append(ImageRef("path", str(p)))
        elif isinstance(v, str):
            head = v[: (min(len(v), 4096) // 4) * 4]
            try:  # check the start now so a broken cell is reported with its line
                base64.b64decode(head, validate=True)
            except binascii.Error:
                raise RowError("image is neither an existing file nor base64") from None
            refs.append(ImageRef("base64", v))
        else:
            raise RowError(f"cannot read image value of type {type(v).__name__}")
    return refs


_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _looks_like_path(value: str, source: str, image_root: Path) -> bool:
    if source == "image_path" or value.lower().endswith(_IMAGE_EXT):
        return True
    return len(value) < 4096 and (Path(value).is_file() or (image_root / value).is_file())


def _require(row: dict, key: str):
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowError(f"missing field {key!r}")
    return value


def _options(row: dict) -> dict[str, str]:
    opts = _literal(row.get("options"))
    if isinstance(opts, dict):
        return {str(k).strip(): str(v) for k, v in opts.items() if v is not None}
    if isinstance(opts, list):
        return {string.ascii_uppercase[i]: str(v) for i, v in enumerate(opts)}
    # VLMEvalKit: option columns A, B, C, ... (empty cells for questions with fewer options)
    cols = {}
    for letter in string.ascii_uppercase:
        if row.get(letter) is None:
            break
        cols[letter] = str(row[letter])
    return cols


def _mcq_answer(answer, options: dict[str, str]) -> str:
    ans = str(answer).strip()
    if ans in options:
        return ans
    if ans.upper() in options and len(ans) == 1:
        return ans.upper()
    for letter, text in options.items():  # answer given as the option text
        if text.strip().lower() == ans.lower():
            return letter
    raise RowError(f"answer {ans!r} is neither an option letter ({''.join(options)}) nor an option text")


def _item_id(row: dict, where: str) -> str:
    for key in ("id", "index", "question_id", "pid"):
        if row.get(key) is not None:
            return str(row[key])
    return where.rsplit(":", 1)[-1].strip()


def item_from_row(kind: str, row: dict, image_root: Path, where: str) -> EvalItem:
    """Validate one row and build its EvalItem; raises RowError naming what is wrong."""
    meta = {"source": where}
    for key in ("category", "l2-category", "object", "sampling", "split", "unit"):
        if row.get(key) is not None:
            meta[key] = row[key]
    if kind == "pope" and "category" not in meta and "sampling" in meta:
        meta["category"] = meta["sampling"]  # POPE reports per negative-sampling split
    item = EvalItem(
        id=_item_id(row, where),
        question=str(_require(row, "question")),
        images=_image_refs(row, image_root),
        hint=str(row["hint"]) if row.get("hint") is not None else None,
        meta=meta,
    )
    if kind in ("mcq", "mmbench", "mcq-circular"):
        item.options = _options(row)
        if len(item.options) < 2:
            raise RowError("a multiple-choice row needs at least 2 options ('options' or columns A, B, ...)")
        item.answer = _mcq_answer(_require(row, "answer"), item.options)
        if row.get("_tsv") and row.get("index") is not None:
            idx = int(float(row["index"]))
            item.group = str(idx % CIRCULAR_STRIDE)
            item.meta["rotation"] = idx // CIRCULAR_STRIDE
    elif kind == "vqa":
        answers = _literal(row.get("answers", row.get("answer")))
        if answers is None:
            raise RowError("missing field 'answers'")
        if not isinstance(answers, list):
            answers = [answers]
        answers = [str(a["answer"] if isinstance(a, dict) else a) for a in answers]
        if not answers or not any(a.strip() for a in answers):
            raise RowError("'answers' is empty")
        item.answers = answers
        if "answers" in row and isinstance(row.get("answer"), str):
            item.answer = row["answer"]  # canonical answer (k-shot demonstrations use it)
    elif kind == "pope":
        ans = str(_require(row, "answer")).strip().lower()
        if ans not in ("yes", "no"):
            raise RowError(f"POPE answer must be yes or no, got {ans!r}")
        item.answer = ans
    elif kind == "math":
        item.answer = str(_require(row, "answer")).strip()
        choices = _literal(row.get("choices"))
        if isinstance(choices, list) and choices:
            item.options = {string.ascii_uppercase[i]: str(c) for i, c in enumerate(choices)}
        qtype = row.get("question_type") or ("multi_choice" if item.options else "free_form")
        if qtype not in ("multi_choice", "free_form"):
            raise RowError(f"question_type must be multi_choice or free_form, got {qtype!r}")
        if qtype == "multi_choice" and not item.options:
            raise RowError("a multi_choice math question needs 'choices'")
        atype = row.get("answer_type") or _guess_answer_type(item.answer)
        if atype not in ("integer", "float", "text", "list"):
            raise RowError(f"answer_type must be integer, float or text, got {atype!r}")
        if atype in ("integer", "float") and qtype == "free_form":
            try:
                float(item.answer.replace(",", ""))
            except ValueError:
                raise RowError(f"answer {item.answer!r} is not a number but answer_type is {atype}") from None
        item.meta.update(question_type=qtype, answer_type=atype)
        if row.get("precision") is not None:
            item.meta["precision"] = int(float(row["precision"]))
    else:
        raise RowError(f"unknown kind {kind!r}")
    return item


def _guess_answer_type(answer: str) -> str:
    try:
        value = float(answer.replace(",", ""))
    except ValueError:
        return "text"
    return "integer" if value == int(value) and "." not in answer else "float"


# ------------------------------------------------------------------------------- loading


def load_items(
    path: str | os.PathLike, kind: str, image_root: str | os.PathLike | None = None, strict: bool = True
) -> tuple[list[EvalItem], dict[str, int]]:
    """All valid items of a task file, and skipped-row counts by reason (non-strict mode)."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    items, skipped = [], Counter()
    seen: set[str] = set()
    for where, row in read_rows(path):
        try:
            if isinstance(row, RowError):
                raise row
            item = item_from_row(kind, row, root, where)
            if item.id in seen:
                raise RowError(f"duplicate id {item.id!r}")
            seen.add(item.id)
        except RowError as e:
            if strict:
                raise TaskError(f"{where}: {e}") from None
            skipped[re.split(r"[:(]", str(e))[0].strip()] += 1
            continue
        items.append(item)
    return items, dict(skipped)


def expand_circular(items: list[EvalItem]) -> list[EvalItem]:
    """CircularEval rows: keep a file's own circular copies, else add the n-1 rotations ourselves."""
    if any(it.group is not None and it.meta.get("rotation", 0) > 0 for it in items):
        return items  # VLMEvalKit circular TSV: rotations are rows already
    out = []
    for it in items:
        for shift in range(len(it.options)):
            options, answer = rotate_options(it.options, it.answer, shift)
            rid = it.id if shift == 0 else f"{it.id}#r{shift}"
            out.append(EvalItem(
                id=rid, question=it.question, images=it.images, answer=answer, options=options,
                hint=it.hint, group=it.id, meta={**it.meta, "rotation": shift},
            ))
    return out


def _limit_questions(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
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


def load_task(spec: TaskSpec, limit: int | None = None, strict: bool = True) -> Task:
    _check_kind(spec.kind, f"task {spec.name!r}")
    items, skipped = load_items(spec.path, spec.kind, spec.image_root, strict)
    scorer = make_scorer(spec.kind)
    items = _limit_questions(items, limit)
    if getattr(scorer, "circular", False):
        items = expand_circular(items)
    if not items:
        raise TaskError(f"task {spec.name!r}: {spec.path} has no usable rows" + (f" (skipped: {skipped})" if skipped else ""))
    support = None
    if spec.support:
        support, _ = load_items(spec.support, spec.kind, spec.image_root, strict)
    return Task(name=spec.name, kind=spec.kind, path=str(spec.path), items=items, scorer=scorer,
                skipped=skipped, support_items=support)
