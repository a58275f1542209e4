"""The demo report's gallery: a dozen held-out questions with their image, the answer after SFT
and after MPO and the gold answer, picked the same way every run (some MPO fixed, some it broke)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from vlmforge.demo.report_common import PHASES, missing, read_json, read_jsonl
from vlmforge.files import PathOutsideRootError, resolve_inside
from vlmforge.report.builder import Section
from vlmforge.report.gallery import Answer, Card, gallery_html

GALLERY_SIZE = 12
# How many cards of each outcome the gallery tries for (in this order); a short group is filled from the others.
GALLERY_MIX = (("fixed", 4), ("broke", 4), ("right", 3), ("wrong", 1))
OUTCOMES = {"fixed": "MPO fixed", "broke": "MPO broke", "right": "both right", "wrong": "both wrong"}
FILL_ORDER = ("right", "fixed", "broke", "wrong")


def _stable_order(task: str, qid: str) -> str:
    return hashlib.sha256(f"{task}/{qid}".encode()).hexdigest()


def _generated(path: Path) -> dict[tuple[str, str], dict]:
    """(task, id) -> the prediction row of each question as asked (generated reply, 0-shot; not the
    likelihood protocol, not MCQ's extra option rotations)."""
    out: dict[tuple[str, str], dict] = {}
    for r in read_jsonl(path):
        if r.get("protocol", "generate") != "generate" or r.get("shots", 0) not in (0, None):
            continue
        qid, task = str(r.get("id", "")), str(r.get("task", ""))
        if "#" in qid or not qid or (task, qid) in out:
            continue
        out[(task, qid)] = r
    return out


def _task_rows(out_dir: Path) -> dict[str, tuple[Path, dict[str, dict]]]:
    """task -> (folder its images are relative to, id -> row), for each .jsonl task of the evals."""
    found: dict[str, tuple[Path, dict[str, dict]]] = {}
    for _, name in PHASES:
        for task, res in read_json(out_dir / "eval" / name / "results.json").get("tasks", {}).items():
            if task in found or not res.get("path"):
                continue
            path = Path(res["path"])
            if not path.is_file():  # the demo folder was moved: its world is still next to the evals
                path = out_dir / "world" / "eval" / path.name
            if path.suffix == ".jsonl" and path.is_file():
                found[task] = (path.parent, {str(r.get("id")): r for r in read_jsonl(path)})
    return found


def _outcome(before: dict, after: dict) -> str:
    b, a = bool(before.get("correct")), bool(after.get("correct"))
    return {(False, True): "fixed", (True, False): "broke", (True, True): "right"}.get((b, a), "wrong")


def gallery_picks(out_dir: Path, n: int = GALLERY_SIZE) -> tuple[list[dict], Counter]:
    """``n`` held-out questions answered both after SFT and after MPO, a mix of outcomes
    (GALLERY_MIX), tasks taken in turn, chosen by a hash of task and id (the same every run).
    Returns the picks ({task, id, outcome, sft, mpo}) and the count of every outcome."""
    sft, mpo = _generated(out_dir / "eval" / "sft" / "predictions.jsonl"), _generated(
        out_dir / "eval" / "mpo" / "predictions.jsonl")
    groups: dict[str, dict[str, list]] = {k: {} for k in OUTCOMES}
    counts: Counter = Counter()
    for key in sorted(set(sft) & set(mpo), key=lambda k: _stable_order(*k)):
        outcome = _outcome(sft[key], mpo[key])
        counts[outcome] += 1
        groups[outcome].setdefault(key[0], []).append(key)

    def in_turn(by_task: dict[str, list]) -> list:
        queues = [list(v) for _, v in sorted(by_task.items())]
        order = []
        while any(queues):
            order.extend(q.pop(0) for q in queues if q)
        return order

    queues = {k: in_turn(v) for k, v in groups.items()}
    picked: dict[str, list] = {k: [] for k in OUTCOMES}
    for outcome, want in GALLERY_MIX:
        picked[outcome] = queues[outcome][:want]
    for outcome in FILL_ORDER:  # fill short groups
        while sum(map(len, picked.values())) < n and len(picked[outcome]) < len(queues[outcome]):
            picked[outcome].append(queues[outcome][len(picked[outcome])])
    picks = [{"task": k[0], "id": k[1], "outcome": o, "sft": sft[k], "mpo": mpo[k]}
             for o in OUTCOMES for k in picked[o]][:n]
    return picks, counts


def _option_text(reply: str, options: dict) -> str:
    """An MCQ letter reply with its option's text ("B (yellow)")."""
    letter = reply.strip().rstrip(".").upper()
    return f"{reply.strip()} ({options[letter]})" if letter in options else reply


def _thumbnail(folder: Path | None, image) -> Path | None:
    """The row's image, only when it lies inside its task's folder (as eval itself reads it)."""
    if folder is None or not isinstance(image, str):
        return None
    try:
        return resolve_inside(folder, image)
    except PathOutsideRootError:
        return None


def _card(pick: dict, folder: Path | None, row: dict) -> Card:
    options = row.get("options") if isinstance(row.get("options"), dict) else {}
    gold = row.get("answer", pick["sft"].get("answer"))
    gold = gold[0] if isinstance(gold, list) and gold else gold
    image = row.get("image")
    image = image[0] if isinstance(image, list) and image else image
    question = row.get("question") or "\n".join(
        line for line in str(pick["sft"].get("prompt", "")).splitlines() if line.strip() != "<image>")

    def answer(label: str, pred: dict) -> Answer:
        text = str(pred.get("prediction", ""))
        return Answer(label, _option_text(text, options) if options else text, bool(pred.get("correct")),
                      extracted=str(pred.get("extracted") or ""))

    detail = row.get("category") or row.get("sampling") or ""
    return Card(
        question=str(question),
        options=" · ".join(f"{k}. {v}" for k, v in options.items()),
        image=_thumbnail(folder, image),
        caption=f"{pick['task']}{' · ' + str(detail) if detail else ''}",
        tag=OUTCOMES[pick["outcome"]], tag_class=pick["outcome"],
        answers=[answer("after SFT", pick["sft"]), answer("after MPO", pick["mpo"]),
                 Answer("gold", _option_text(str(gold), options) if options else str(gold))],
    )


def gallery_section(out_dir: Path) -> Section:
    title = "Held-out questions: answers after SFT and after MPO"
    picks, counts = gallery_picks(out_dir)
    if not picks:
        return missing(title, "eval/sft/predictions.jsonl and eval/mpo/predictions.jsonl have no questions in common")
    tasks = _task_rows(out_dir)
    cards = []
    for p in picks:
        folder, rows = tasks.get(p["task"], (None, {}))
        cards.append(_card(p, folder, rows.get(p["id"], {})))
    total = sum(counts.values())
    text = (f"{len(cards)} of the {total} held-out questions as the models were asked them (MCQ by letter, "
            f"first option order), picked for a mix of outcomes. Over all {total}: "
            + ", ".join(f"{OUTCOMES[k]} {counts[k]}" for k in OUTCOMES) + ".")
    return Section(title, text=text, html=gallery_html(cards))
