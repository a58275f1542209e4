"""`vlmforge prm-data`: step-labelled solutions for training a process reward model (VisualPRM400K's
format), from a policy's own samples to questions with known answers.

Questions are eval task rows read as their kind (``vlmforge.eval``; read and asked 0-shot exactly as
``vlmforge eval`` asks them, through ``preference.build.load_plan``), judged by the kind's scorer.
The labelling is ``montecarlo.label_questions``. The work is cut into parts of
``questions_per_part`` consecutive questions, independent of the number of ranks; part i goes to
rank i % world and is written atomically to ``OUT/parts/prm-NNNNN.jsonl`` when done, so a
restarted run redoes only missing parts. Rank 0 merges the parts in question order, so any number
of ranks and any kill and restart write the same ``prm.json`` and ``steps.jsonl``.

Outputs: ``prm.json`` (a LLaVA json list, one ``critic.steps.critic_record`` per solution, id
``<question id>-s<k>``), ``steps.jsonl`` (per solution: id, question_id, task, image, question,
steps, mc, labels, correct, extracted, answer, source) and ``manifest.json``. Image paths are
relative to the manifest's ``image_root``: ``--image-root`` (default: the input files' common
folder) when it holds every image, else the images' common folder; inline images (base64 TSV
cells, parquet bytes) are saved under ``OUT/images/``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from vlmforge import dist
from vlmforge.critic.steps import MAX_STEPS, critic_question, critic_record
from vlmforge.curate.io import my_items, remove_temp_leftovers
from vlmforge.errors import UserError
from vlmforge.eval.asking import ItemImageError, load_item_images
from vlmforge.eval.items import EvalItem, TaskError
from vlmforge.eval.kind import Kind
from vlmforge.eval.prompts import user_turn
from vlmforge.eval.specs import TaskSpec
from vlmforge.files import atomic_write_text, note_example, write_json, write_manifest
from vlmforge.preference.build import Plan, Question, common_image_root, item_image_paths, load_plan, part_path
from vlmforge.rollouts.montecarlo import Ask, Cost, Policy, label_questions

STAGE = "prm-data"
PRM_FILE = "prm.json"
STEPS_FILE = "steps.jsonl"
IDENTITY_FILE = "inputs.json"
PARTS_DIR = "parts"
IMAGES_DIR = "images"
PART_NAME = "prm"
# What a run writes into its folder (and --overwrite removes; nothing else there is touched).
RUN_FILES = (PRM_FILE, STEPS_FILE, "manifest.json", IDENTITY_FILE)
RUN_DIRS = (PARTS_DIR, IMAGES_DIR)


@dataclass(frozen=True)
class PrmSettings:
    solutions: int = 4  # solutions sampled per question (K)
    rollouts: int = 8  # continuations per step prefix (M)
    temperature: float = 1.0
    top_p: float = 1.0
    max_steps: int = MAX_STEPS
    max_new_tokens: int = 128  # per generation, a solution or a continuation
    batch_size: int = 64  # rows per generate call
    questions_per_part: int = 16  # the unit of resuming and of sharding
    seed: int = 0

    def check(self) -> None:
        for name in ("solutions", "rollouts", "max_steps", "max_new_tokens", "batch_size", "questions_per_part"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0 (the rollouts must differ), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


def load_questions(specs: list[TaskSpec], *, image_root: str | os.PathLike | None = None, strict: bool = True,
                   allow_absolute_paths: bool = False, limit: int | None = None) -> Plan:
    """Every question file read as its kind; bad rows skipped and counted with file:line (``strict``:
    ``TaskError`` at the first). Question ids must be unique over all files: they name the outputs
    and seed the samples."""
    plan = load_plan(specs, image_root=image_root, strict=strict, allow_absolute_paths=allow_absolute_paths,
                     limit=limit)
    seen: dict[str, str] = {}
    kept = []
    for q in plan.questions:
        where = q.item.meta.get("source")
        if q.item.id in seen:
            error = f"question id {q.item.id!r} is also at {seen[q.item.id]}"
            if strict:
                raise TaskError(f"{where}: {error}")
            plan.add_skips({"duplicate_question_id": 1},
                           {"duplicate_question_id": [{"where": where, "error": error}]})
            continue
        seen[q.item.id] = where
        kept.append(q)
    plan.questions = kept
    return plan


def parts_of(plan: Plan, settings: PrmSettings) -> list[tuple[int, int, int]]:
    """(part number, first question, end) of every part."""
    n, size = len(plan.questions), settings.questions_per_part
    return [(i, start, min(start + size, n)) for i, start in enumerate(range(0, n, size))]


def _judge(rules: Kind, item: EvalItem, reply: str) -> tuple[bool, Any]:
    scored = rules.score_prediction(reply, item)
    return scored.score >= 1.0, scored.extracted


def _answer(item: EvalItem):
    return item.answer if item.answer is not None else item.answers


def part_lines(questions: list[Question], policy: Policy, settings: PrmSettings, out: Path, *, strict: bool,
               bar=None) -> list[dict]:
    """One part's lines: per question its statistics, its labelled solutions and its skips; the part's cost."""
    s = settings
    lines: list[dict] = []
    asks, asked = [], []
    for q in questions:
        where = q.item.meta.get("source")
        try:
            images = load_item_images(q.item)
        except ItemImageError as e:
            if strict:
                raise TaskError(f"{where}: {e}") from None
            lines.append({"skip": {"reason": e.reason, "where": where, "error": str(e)}})
            if bar is not None:
                bar.total -= s.solutions
                bar.refresh()
            continue
        asks.append(Ask(q.item.id, [user_turn(q.kind, q.item)], images, functools.partial(_judge, q.rules, q.item)))
        asked.append(q)
    labelled, cost = label_questions(asks, policy, solutions=s.solutions, rollouts=s.rollouts, max_steps=s.max_steps,
                                     seed=s.seed, batch_size=s.batch_size, bar=bar) if asks else ([], Cost())
    for q, ask, sols in zip(asked, asks, labelled):
        where = q.item.meta.get("source")
        lines.append({"question": {"id": q.item.id, "sampled": len(sols), "correct": sum(x.correct for x in sols)}})
        paths = item_image_paths(q.item, out / IMAGES_DIR)
        question = critic_question(ask.messages)
        for sol in sols:
            if not sol.steps:
                lines.append({"skip": {"reason": "empty_solution", "where": where,
                                       "error": f"solution {sol.k} of question {q.item.id!r} is empty (no steps)"}})
                continue
            lines.append({"solution": {
                "id": f"{q.item.id}-s{sol.k}", "question_id": q.item.id, "task": q.task, "image": paths,
                "question": question, "steps": sol.steps, "mc": sol.mc, "labels": sol.labels,
                "correct": sol.correct, "extracted": sol.extracted, "answer": _answer(q.item), "source": where,
            }})
    lines.append({"cost": asdict(cost)})
    return lines


def build_parts(plan: Plan, out_dir: str | os.PathLike, settings: PrmSettings, make_policy: Callable[[], Policy], *,
                strict: bool = True, rank: int | None = None, world: int | None = None, progress: bool = True) -> int:
    """Write this rank's missing parts; returns how many. The policy is made at the first one (a
    finished folder needs no model)."""
    out = Path(out_dir)
    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    todo = [p for p in my_items(parts_of(plan, settings), rank, world) if not part_path(out, PART_NAME, p[0]).exists()]
    policy = None
    total = sum(stop - start for _, start, stop in todo) * settings.solutions
    with tqdm(total=total, desc=STAGE, unit="gen", disable=not progress or rank != 0, dynamic_ncols=True,
              mininterval=1.0) as bar:
        for index, start, stop in todo:
            if policy is None:
                policy = make_policy()
            lines = part_lines(plan.questions[start:stop], policy, settings, out, strict=strict, bar=bar)
            text = "".join(json.dumps(x, ensure_ascii=False, default=str) + "\n" for x in lines)
            atomic_write_text(part_path(out, PART_NAME, index), text)
    return len(todo)


def _relative(paths: list[str], root: str | None) -> str | list[str] | None:
    rel = [os.path.relpath(p, root) for p in paths]
    return None if not rel else rel[0] if len(rel) == 1 else rel


def merge_parts(plan: Plan, out_dir: str | os.PathLike, settings: PrmSettings, info: dict | None = None) -> dict:
    """Main rank, after every part: ``prm.json``, ``steps.jsonl`` and ``manifest.json``."""
    out = Path(out_dir)
    rows, cost = [], Cost()
    skipped, examples = Counter(plan.skipped), {k: list(v) for k, v in plan.examples.items()}
    asked = sampled = correct = all_correct = all_wrong = 0
    for index, _, _ in parts_of(plan, settings):
        path = part_path(out, PART_NAME, index)
        if not path.is_file():
            raise UserError(f"{path} is missing: a rank stopped before finishing; run the same command again to resume")
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if "solution" in entry:
                rows.append(entry["solution"])
            elif "question" in entry:
                q = entry["question"]
                asked += 1
                sampled += q["sampled"]
                correct += q["correct"]
                all_correct += int(q["correct"] == q["sampled"])
                all_wrong += int(q["correct"] == 0)
            elif "cost" in entry:
                cost.add(Cost(**entry["cost"]))
            else:
                skip = entry["skip"]
                skipped[skip["reason"]] += 1
                note_example(examples, skip["reason"], {"where": skip["where"], "error": skip["error"]})
    root = common_image_root(plan, sorted({p for row in rows for p in row["image"]}))
    records, lines = [], []
    for row in rows:
        row = {**row, "image": _relative(row["image"], root)}
        records.append(json.dumps(critic_record(row["id"], row["image"], row["question"], row["steps"], row["labels"]),
                                  ensure_ascii=False))
        lines.append(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    atomic_write_text(out / PRM_FILE, "[\n" + ",\n".join(records) + "\n]\n" if records else "[]\n")
    atomic_write_text(out / STEPS_FILE, "".join(lines))
    steps = sum(len(r["steps"]) for r in rows)
    minus = sum(label == "-" for r in rows for label in r["labels"])
    counts = {
        "questions": len(plan.questions),
        "questions_asked": asked,
        "solutions": len(rows),
        "solutions_sampled": sampled,
        "solution_accuracy": correct / sampled if sampled else 0.0,
        "steps": steps,
        "steps_per_solution": steps / len(rows) if rows else 0.0,
        "minus_share": minus / steps if steps else 0.0,
        "questions_all_correct": all_correct,
        "questions_all_wrong": all_wrong,
        "generations": asdict(cost),
        "skipped": dict(skipped),
    }
    write_manifest(out, STAGE, inputs=plan.inputs, config=asdict(settings), counts=counts, dropped=dict(skipped),
                   dropped_examples=examples, image_root=root, outputs={"prm": PRM_FILE, "steps": STEPS_FILE},
                   **(info or {}))
    return json.loads((out / "manifest.json").read_text())


def _changes(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _changes(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    if old == new:
        return []
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return [f"{where} changed"]
    return [f"{where}: {old} -> {new}"]


def clear_run(out_dir: str | os.PathLike) -> None:
    """Remove what a prm-data run wrote into ``out_dir`` (``--overwrite``); other files stay."""
    out = Path(out_dir)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def prepare_folder(out_dir: str | os.PathLike, identity: dict) -> None:
    """Main rank, before any part: the folder exists, a killed run's temp files are gone, and it
    holds no other run (``inputs.json`` records this one's inputs and settings)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_leftovers(out)
    identity = json.loads(json.dumps(identity))
    path = out / IDENTITY_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != identity:
            changes = _changes(old, identity)
            raise UserError(f"{out} holds a prm-data run with other inputs or settings ({'; '.join(changes[:4])}); "
                            "run the same command to resume it, or pass --overwrite, or choose another --out")
    else:
        write_json(path, identity)


def build_prm_data(plan: Plan, out_dir: str | os.PathLike, settings: PrmSettings, make_policy: Callable[[], Policy], *,
                   identity: dict, strict: bool = True, info: dict | None = None, progress: bool = True) -> dict:
    """The whole run on every rank of a torchrun job (or one process): prepare the folder, write this
    rank's parts, merge on the main rank. Returns the manifest (main rank; {} elsewhere)."""
    if dist.is_main():
        prepare_folder(out_dir, identity)
    dist.barrier()
    build_parts(plan, out_dir, settings, make_policy, strict=strict, progress=progress)
    dist.barrier()
    manifest = merge_parts(plan, out_dir, settings, info) if dist.is_main() else {}
    dist.barrier()
    return manifest


def read_steps(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``steps.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
