"""Preference pairs from a model's own samples (MMPR's recipes, ``vlmforge.preference.pairs``),
written as MMPR jsonl for ``vlmforge preference index``.

Questions are eval task rows (``vlmforge.eval``: the same kinds, files and prompts as ``vlmforge
eval``, asked 0-shot as its ``generate`` protocol asks them); long answers are rows ``{image,
question, answer}``. A generate call holds ``batch_size`` rows: whole questions x ``samples``, or
long answers. The work is cut into parts that do not depend on the number of ranks:
``questions_per_part`` consecutive questions, or ``batch_size`` consecutive long answers. Part i
goes to rank i % world (like ``curate score``'s shards) and is written atomically to
``OUT/parts/<recipe>-NNNNN.jsonl``, so its presence means done: a restarted run redoes only the
missing parts. Every sampled reply has its own seed (from the run's seed, the question and the
reply's number), so any number of ranks and any number of restarts merge into the same
``OUT/pairs.jsonl``.

Output rows: ``image`` (a path relative to the image root, or a list of them), ``question`` (with
one ``<image>`` line per image), ``chosen``, ``rejected``, ``answer_gt``, ``recipe``
(``correctness`` | ``dropout_ntp``), ``kind``, ``task``, ``id``, ``source`` (file:line). The image
root is ``--image-root`` (default: the folder of the input files) when it holds every image, else
the images' common folder; ``OUT/meta.json`` names it (InternVL's meta format) and so does the
manifest. Images given inline (base64 TSV cells, parquet bytes) are saved under ``OUT/images/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from vlmforge import dist
from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.curate.io import check_same_inputs, my_items, remove_temp_leftovers
from vlmforge.errors import UserError
from vlmforge.eval.asking import ItemImageError, load_item_images, read_items, read_questions
from vlmforge.eval.items import EvalItem, RowError, TaskError, common_item, require
from vlmforge.eval.kind import Kind
from vlmforge.eval.kinds import get_kind
from vlmforge.eval.prompt_parts import with_hint
from vlmforge.eval.prompts import user_turn
from vlmforge.eval.specs import TaskSpec
from vlmforge.eval.tasks import limit_questions
from vlmforge.files import atomic_write_bytes, atomic_write_text, note_example, write_json, write_manifest
from vlmforge.imagedecode import open_image
from vlmforge.preference.pairs import (
    QuestionStats,
    correctness_pairs,
    first_half,
    with_image_markers,
    without_image_markers,
)
from vlmforge.preference.sampler import Sampler, SampleRequest

RECIPES = ("correctness", "dropout_ntp")
PARTS_DIR = "parts"
IMAGES_DIR = "images"
PAIRS_FILE = "pairs.jsonl"
META_FILE = "meta.json"
STAGE = "preference-build"


@dataclass(frozen=True)
class BuildSettings:
    samples: int = 8  # replies sampled per question
    temperature: float = 0.7
    top_p: float = 1.0
    pairs_per_question: int = 2  # at most this many pairs from one question
    seed: int = 0
    max_new_tokens: int = 32  # per sampled reply; a reply that reaches it is judged but not paired
    batch_size: int = 64  # rows per generate call: whole questions x samples, or long answers
    questions_per_part: int = 32  # questions per part file (the unit of resuming and of sharding)

    def check(self) -> None:
        for name in ("samples", "pairs_per_question", "max_new_tokens", "batch_size", "questions_per_part"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0 (the samples must differ), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class Question:
    task: str  # the spec's name (NAME=KIND:PATH, default KIND:STEM)
    kind: str
    rules: Kind
    item: EvalItem


@dataclass
class Plan:
    """Everything to ask, in output order, and the rows that could not be read."""

    questions: list[Question] = field(default_factory=list)
    long_answers: list[EvalItem] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)  # each input file: what it is read as, its size and sha256
    image_root: str | None = None  # --image-root (resolved), when given

    def parts(self, settings: BuildSettings) -> list[tuple[str, int, int, int]]:
        """(recipe, part number, first unit, end) for every part, correctness first."""
        out = []
        for recipe, n, size in (("correctness", len(self.questions), settings.questions_per_part),
                                ("dropout_ntp", len(self.long_answers), settings.batch_size)):
            out += [(recipe, i, start, min(start + size, n)) for i, start in enumerate(range(0, n, size))]
        return out

    def add_skips(self, skipped: dict, examples: dict) -> None:
        self.skipped.update(skipped)
        for reason, kept in examples.items():
            for example in kept:
                note_example(self.examples, reason, example)


def _file_signature(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def parse_long_answer(row: dict, image_root: Path, where: str) -> EvalItem:
    """A long-answer row: ``{id?, image | images, question, answer, hint?}``."""
    item = common_item(row, image_root, where)
    item.answer = str(require(row, "answer")).strip()
    if IMAGE_TOKEN in item.answer:
        raise RowError(f"an {IMAGE_TOKEN} marker in the answer (images go in the question)")
    return item


def load_plan(
    specs: list[TaskSpec], long_answers: str | os.PathLike | None = None, *, image_root: str | os.PathLike | None = None,
    strict: bool = False, allow_absolute_paths: bool = False, limit: int | None = None,
) -> Plan:
    """Read every question file (as its kind) and the long-answer file; bad rows are skipped and
    counted with file:line (``strict``: ``TaskError`` at the first). ``limit``: first N questions
    per file (CircularEval rotations count as one)."""
    plan = Plan(image_root=os.path.realpath(image_root) if image_root is not None else None)
    for spec in specs:
        root = spec.image_root if spec.image_root is not None else image_root
        read = read_questions(spec.path, spec.kind, root, strict, allow_absolute_paths)
        rules = get_kind(spec.kind)
        plan.questions += [Question(spec.name, spec.kind, rules, it) for it in rules.prepare(limit_questions(read.items, limit))]
        plan.add_skips(read.skipped, read.examples)
        plan.inputs.append({"name": spec.name, "kind": spec.kind, "path": os.path.realpath(spec.path),
                            "image_root": None if root is None else os.path.realpath(root), **_file_signature(spec.path)})
    if long_answers is not None:
        read = read_items(long_answers, parse_long_answer, image_root, strict, allow_absolute_paths)
        plan.long_answers = read.items[:limit] if limit is not None else read.items
        plan.add_skips(read.skipped, read.examples)
        plan.inputs.append({"name": "long_answers", "kind": "long_answer", "path": os.path.realpath(long_answers),
                            "image_root": None if image_root is None else os.path.realpath(image_root),
                            **_file_signature(str(long_answers))})
    return plan


def question_seed(seed: int, task: str, item_id: str) -> int:
    """A question's own sampling seed: from the run's seed, the task's name and the question's id only."""
    digest = hashlib.sha256(f"{seed}\0{task}\0{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def item_image_paths(item: EvalItem, images_dir: Path) -> list[str]:
    """Absolute image paths; inline images are saved under ``images_dir`` by content hash."""
    out = []
    for ref in item.images:
        if ref.kind == "path":
            out.append(os.path.realpath(ref.value))
            continue
        data = ref.read_bytes()
        with open_image(io.BytesIO(data)) as im:
            ext = (im.format or "img").lower()
        path = images_dir / f"{hashlib.sha1(data).hexdigest()}.{ext}"
        if not path.exists():
            atomic_write_bytes(path, data)
        out.append(str(path.resolve()))
    return out


class _PartRunner:
    """Turns one part into its lines: pairs, per-question statistics and skipped rows."""

    def __init__(self, settings: BuildSettings, sampler: Sampler, out: Path, strict: bool):
        self.settings, self.sampler, self.strict = settings, sampler, strict
        self.images_dir = out / IMAGES_DIR

    def _images(self, item: EvalItem) -> list | dict:
        """The decoded images, or a skip line."""
        where = item.meta.get("source")
        try:
            return load_item_images(item)
        except ItemImageError as e:
            if self.strict:
                raise TaskError(f"{where}: {e}") from None
            return {"skip": {"reason": e.reason, "where": where, "error": str(e)}}

    def correctness(self, questions: list[Question], bar) -> list[dict]:
        s = self.settings
        per_call = max(1, s.batch_size // s.samples)  # whole questions per generate call
        lines: list[dict] = []
        batch: list[tuple[Question, SampleRequest]] = []

        def flush():
            replies = self.sampler.sample([req for _, req in batch]) if batch else []
            if len(replies) != len(batch) or any(len(r) != s.samples for r in replies):
                raise RuntimeError(f"the sampler answered {[len(r) for r in replies]} for {len(batch)} x {s.samples} asked")
            for (q, req), samples in zip(batch, replies):
                lines.extend(self._judged(q, req, samples))
            bar.update(len(batch))
            batch.clear()

        for q in questions:
            images = self._images(q.item)
            if isinstance(images, dict):
                lines.append(images)
                bar.update(1)
                continue
            message = user_turn(q.kind, q.item)  # the eval's 0-shot prompt, <image> markers first
            batch.append((q, SampleRequest([message], images, s.samples, question_seed(s.seed, q.task, q.item.id))))
            if len(batch) == per_call:
                flush()
        flush()
        return lines

    def _judged(self, q: Question, req: SampleRequest, samples: list) -> list[dict]:
        combos, stats = correctness_pairs(q.rules, q.item, samples, self.settings.pairs_per_question,
                                          random.Random(req.seed))
        paths = item_image_paths(q.item, self.images_dir) if combos else []
        lines = [{"pair": {
            "image": paths, "question": req.messages[0]["content"], "chosen": chosen, "rejected": rejected,
            "answer_gt": q.rules.demo_answer(q.item), "recipe": "correctness", "kind": q.kind,
            "task": q.task, "id": q.item.id, "source": q.item.meta.get("source"),
        }} for chosen, rejected in combos]
        lines.append({"question": {"task": q.task, **asdict(stats)}})
        return lines

    def dropout_ntp(self, items: list[EvalItem], bar) -> list[dict]:
        lines, todo = [], []
        for item in items:
            where = item.meta.get("source")
            images = self._images(item)  # not shown to the model, but the pair's prompt has them
            if isinstance(images, dict):
                lines.append(images)
                continue
            half = first_half(item.answer)
            if half is None:
                lines.append({"skip": {"reason": "answer_too_short", "where": where,
                                       "error": "a long answer needs at least 2 words to keep half of"}})
                continue
            rest = " ".join(item.answer.split()[len(half.split()):])
            todo.append((item, half, rest))
        texts = self.sampler.continue_answers(
            [[{"role": "user", "content": without_image_markers(with_hint(it))}] for it, _, _ in todo],
            [h for _, h, _ in todo], [r for _, _, r in todo]) if todo else []
        if len(texts) != len(todo):
            raise RuntimeError(f"the sampler returned {len(texts)} continuations for {len(todo)} answers")
        for (item, half, _), text in zip(todo, texts):
            where = item.meta.get("source")
            rejected = text.strip()
            if rejected == item.answer:
                lines.append({"skip": {"reason": "continuation_equals_answer", "where": where,
                                       "error": "the model completed the answer word for word without the image"}})
                continue
            lines.append({"pair": {
                "image": item_image_paths(item, self.images_dir),
                "question": with_image_markers(with_hint(item), len(item.images)),
                "chosen": item.answer, "rejected": rejected, "answer_gt": item.answer, "recipe": "dropout_ntp",
                "kind": "long_answer", "task": "long_answers", "id": item.id, "source": where,
            }, "continued": rejected != half})
        bar.update(len(items))
        return lines


def part_path(out: Path, recipe: str, index: int) -> Path:
    return out / PARTS_DIR / f"{recipe}-{index:05d}.jsonl"


def prepare_folder(out_dir: str | os.PathLike, identity: dict) -> None:
    """Main rank, before any part: the folder exists, a killed run's temp files are gone, and it
    holds no other run (``inputs.json`` records this one's inputs and settings)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_leftovers(out)
    check_same_inputs(out, json.loads(json.dumps(identity)), "preference build")


def build_parts(
    plan: Plan, out_dir: str | os.PathLike, settings: BuildSettings, make_sampler: Callable[[], Sampler], *,
    strict: bool = False, rank: int | None = None, world: int | None = None, progress: bool = True,
) -> int:
    """Write this rank's missing parts; returns how many. The sampler is made at the first one (a
    finished folder needs no model)."""
    out = Path(out_dir)
    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    todo = [p for p in my_items(plan.parts(settings), rank, world) if not part_path(out, p[0], p[1]).exists()]
    runner = None
    units = sum(stop - start for _, _, start, stop in todo)
    with tqdm(total=units, desc="preference build", unit="q", disable=not progress or rank != 0,
              dynamic_ncols=True, mininterval=1.0) as bar:
        for recipe, index, start, stop in todo:
            if runner is None:
                runner = _PartRunner(settings, make_sampler(), out, strict)
            if recipe == "correctness":
                lines = runner.correctness(plan.questions[start:stop], bar)
            else:
                lines = runner.dropout_ntp(plan.long_answers[start:stop], bar)
            atomic_write_text(part_path(out, recipe, index), "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return len(todo)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def common_image_root(plan: Plan, paths: list[str]) -> str | None:
    """--image-root, else the input files' common folder, when it holds every image; else the images' common folder."""
    if not paths:
        return None
    if plan.image_root is not None:
        candidate = plan.image_root
    else:
        candidate = os.path.commonpath([os.path.dirname(i["path"]) for i in plan.inputs])
    if all(_inside(p, candidate) for p in paths):
        return candidate
    return os.path.commonpath([os.path.dirname(p) for p in paths])


def merge_parts(plan: Plan, out_dir: str | os.PathLike, settings: BuildSettings, info: dict | None = None) -> dict:
    """Main rank, after every part: ``pairs.jsonl`` (parts in order), ``meta.json`` and ``manifest.json``."""
    out = Path(out_dir)
    pairs, by_task, dropped = [], {}, Counter(plan.skipped)
    examples = {k: list(v) for k, v in plan.examples.items()}
    dropout = {"long_answers": len(plan.long_answers), "pairs": 0, "empty_continuation": 0}
    for recipe, index, _, _ in plan.parts(settings):
        path = part_path(out, recipe, index)
        if not path.is_file():
            raise UserError(f"{path} is missing: a rank stopped before finishing; run the same command again to resume")
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if "pair" in entry:
                pairs.append(entry["pair"])
                if recipe == "dropout_ntp":
                    dropout["pairs"] += 1
                    dropout["empty_continuation"] += int(not entry["continued"])
            elif "question" in entry:
                stats = dict(entry["question"])
                task = stats.pop("task")
                by_task.setdefault(task, QuestionStats()).add(QuestionStats(**stats))
            else:
                skip = entry["skip"]
                dropped[skip["reason"]] += 1
                note_example(examples, skip["reason"], {"where": skip["where"], "error": skip["error"]})
    root = common_image_root(plan, sorted({p for row in pairs for p in row["image"]}))
    text = []
    for row in pairs:
        rel = [os.path.relpath(p, root) for p in row["image"]]
        text.append(json.dumps({**row, "image": rel[0] if len(rel) == 1 else rel}, ensure_ascii=False) + "\n")
    atomic_write_text(out / PAIRS_FILE, "".join(text))
    # Absolute paths: InternVL reads a meta.json's paths from the working folder first.
    write_json(out / META_FILE, {"vlmforge_preference_build": {"root": root, "annotation": str((out / PAIRS_FILE).resolve()),
                                                               "repeat_time": 1, "length": len(pairs)}})
    total = QuestionStats()
    for stats in by_task.values():
        total.add(stats)
    by_recipe = Counter(row["recipe"] for row in pairs)
    counts = {
        "questions": len(plan.questions),
        "questions_asked": total.questions,
        "samples": total.samples,
        "sample_accuracy": total.as_dict()["accuracy"],
        "pairs": len(pairs),
        "pairs_by_recipe": {r: by_recipe.get(r, 0) for r in RECIPES},
        "questions_no_correct": total.no_correct,
        "questions_no_incorrect": total.no_incorrect,
        "long_answers": len(plan.long_answers),
        "skipped_rows": sum(dropped.values()),
    }
    write_manifest(
        out, STAGE, inputs=plan.inputs, config=asdict(settings), counts=counts, dropped=dict(dropped),
        dropped_examples=examples, per_task={t: s.as_dict() for t, s in by_task.items()}, dropout_ntp=dropout,
        image_root=root, outputs={"pairs": PAIRS_FILE, "meta": META_FILE}, **(info or {}),
    )
    return json.loads((out / "manifest.json").read_text())


def build_preferences(
    plan: Plan, out_dir: str | os.PathLike, settings: BuildSettings, make_sampler: Callable[[], Sampler], *,
    identity: dict, strict: bool = False, info: dict | None = None, progress: bool = True,
) -> dict:
    """The whole build on every rank of a torchrun job (or one process): prepare the folder, write
    this rank's parts, merge on the main rank. Returns the manifest (main rank; {} elsewhere)."""
    if dist.is_main():
        prepare_folder(out_dir, identity)
    dist.barrier()
    build_parts(plan, out_dir, settings, make_sampler, strict=strict, progress=progress)
    dist.barrier()
    manifest = merge_parts(plan, out_dir, settings, info) if dist.is_main() else {}
    dist.barrier()
    return manifest


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``pairs.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
