"""Score solutions step by step with a process reward model (a checkpoint trained with
train.stage=prm): each step gets P('+') against P('-') at its verdict turn, all steps of a solution
in one forward pass; the solution's score aggregates them (--aggregate, VisualPRM: mean).

Input rows (jsonl): {"id", "image": PATH | "images": [PATH, ...] (optional), "question" and/or
"prompt", "steps": [TEXT, ...] | "solution": TEXT, "labels": ["+" | "-", ...] (optional)}.
The critic is shown `prompt` when a row has one (what the policy was asked, e.g. the question with
its step-by-step instruction, as `vlmforge prm-data` trains it), else `question`; <image> markers
are removed. A `solution` text is cut into steps on blank lines, merged to at most --max-steps;
a `steps` list is scored as given. Image paths resolve inside --image-root (default: the input
file's folder; absolute paths only with --allow-absolute-paths).

Output rows: {"id", "steps", "step_scores", "score", "labels" (if given)}, in input order. With
labels, the command prints and writes (OUT's manifest, OUT with .manifest.json) the step accuracy
at threshold 0.5, the accuracy on '+' and on '-' steps, and the share of solutions with a wrong
step whose first '-' label is the first step scored below 0.5.

A bad row stops the command with its file:line (default); --no-strict skips it and counts it by
reason in the manifest.

Examples:
  vlmforge prm-score --critic runs/prm/final --input world/eval/math_steps.jsonl --out prm_scores.jsonl
  vlmforge prm-score --critic C --input sols.jsonl --image-root imgs --out s.jsonl --aggregate min --no-strict
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmforge.errors import UserError

HELP = "score solutions step by step with a process reward model (P('+') per step, one forward pass)"
AGGREGATE_CHOICES = ("mean", "min", "last", "product")  # vlmforge.critic.score.AGGREGATES (torch-free here)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--critic", required=True, help="checkpoint trained with train.stage=prm (a folder or a run folder)")
    p.add_argument("--input", required=True, help="jsonl of solutions (see above)")
    p.add_argument("--out", required=True, help="output jsonl; its manifest goes next to it (OUT with .manifest.json)")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the input's folder)")
    p.add_argument("--aggregate", default="mean", choices=AGGREGATE_CHOICES,
                   help="a solution's score from its step scores (default: mean, as VisualPRM)")
    p.add_argument("--batch-size", type=int, default=8, help="solutions per forward pass")
    p.add_argument("--max-steps", type=int, default=12, help="a `solution` text is merged to at most this many steps")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="write over an existing --out")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="skip bad rows and count them in the manifest (default: stop at the first, naming file:line)")
    p.add_argument("--allow-absolute-paths", action="store_true", help="accept absolute image paths")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run setting of the critic's recipe (repeatable)")


class BadRow(ValueError):
    """A row that cannot be scored; ``reason`` is what it is counted under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Solution:
    id: str
    where: str
    question: str
    image_paths: list[str]
    steps: list[str]
    labels: list[str] | None = None
    images: list = field(default_factory=list)


def _strings(value: Any, what: str, reason: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise BadRow(f"{what} must be a list of strings", reason)
    return value


def parse_row(row: Any, where: str, image_root: Path | None, max_steps: int, allow_absolute: bool) -> Solution:
    """One input row as a solution to score; :class:`BadRow` saying what is wrong."""
    from vlmforge.arch.tokens import PRM_MINUS, PRM_PLUS
    from vlmforge.critic.steps import critic_question, split_steps
    from vlmforge.files import PathOutsideRootError, resolve_inside

    if not isinstance(row, dict):
        raise BadRow(f"row is a {type(row).__name__}, not an object", "not_an_object")
    rid = row.get("id", row.get("question_id"))
    rid = where.rsplit(":", 1)[-1] if rid is None else str(rid)
    text = next((row[k] for k in ("prompt", "question") if isinstance(row.get(k), str) and row[k].strip()), None)
    if text is None:
        raise BadRow("no 'prompt' or 'question' text", "no_question")
    question = critic_question([{"role": "user", "content": text}])
    if "steps" in row:
        steps = [s.strip() for s in _strings(row["steps"], "'steps'", "bad_steps")]
        if any(not s for s in steps):
            raise BadRow("'steps' holds an empty step", "bad_steps")
    elif isinstance(row.get("solution"), str):
        steps = split_steps(row["solution"], max_steps)
    else:
        raise BadRow("no 'steps' list or 'solution' text", "no_steps")
    if not steps:
        raise BadRow("the solution has no steps", "no_steps")
    labels = None
    if row.get("labels") is not None:
        labels = _strings(row["labels"], "'labels'", "bad_labels")
        if len(labels) != len(steps) or any(x not in (PRM_PLUS, PRM_MINUS) for x in labels):
            raise BadRow(f"'labels' must be one {PRM_PLUS!r} or {PRM_MINUS!r} per step ({len(steps)} steps), "
                         f"got {labels}", "bad_labels")
    raw = row.get("images", row.get("image"))
    raw = [] if raw is None or raw == "" else [raw] if isinstance(raw, str) else raw
    paths = []
    for p in _strings(raw, "'images'", "bad_image_field"):
        try:
            resolved = resolve_inside(image_root, p, allow_absolute=allow_absolute)
        except PathOutsideRootError as e:
            raise BadRow(str(e), e.reason) from None
        if not resolved.is_file():
            raise BadRow(f"image file not found: {resolved}", "missing_image")
        paths.append(str(resolved))
    return Solution(rid, where, question, paths, steps, labels)


def read_solutions(path: Path, image_root: Path | None, max_steps: int, strict: bool, allow_absolute: bool,
                   skipped: dict, examples: dict) -> list[Solution]:
    from vlmforge.files import note_example, numbered_lines

    out, seen = [], set()
    for where, line in numbered_lines(path):
        try:
            try:
                row = json.loads(line)
            except ValueError as e:
                raise BadRow(f"JSON does not parse: {e}", "json_error") from None
            sol = parse_row(row, where, image_root, max_steps, allow_absolute)
            if sol.id in seen:
                raise BadRow(f"duplicate id {sol.id!r}", "duplicate_id")
            seen.add(sol.id)
        except BadRow as e:
            if strict:
                raise UserError(f"{where}: {e} (--no-strict skips and counts bad rows)") from None
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            note_example(examples, e.reason, {"where": where, "error": str(e)})
            continue
        out.append(sol)
    return out


def load_images(sol: Solution) -> list:
    from vlmforge.imagedecode import ImageDecodeError, ImageTooLargeError, decode_image

    images = []
    for p in sol.image_paths:
        try:
            images.append(decode_image(Path(p).read_bytes()))
        except ImageTooLargeError as e:
            raise BadRow(f"{p}: {e}", "image_too_large") from None
        except (OSError, ImageDecodeError) as e:
            raise BadRow(f"image does not decode: {p}: {e}", "bad_image") from None
    return images


def label_metrics(step_scores: list[list[float]], labels: list[list[str]], threshold: float = 0.5) -> dict:
    """How the scores read the labels: a step is judged '+' when its score >= ``threshold``.

    ``step_accuracy``: share of all labelled steps judged as labelled; ``plus_accuracy`` /
    ``minus_accuracy``: the same among '+' / '-' steps; ``first_error_found``: among solutions with
    a '-' step, the share whose first step scored below the threshold is the first '-' step
    (``wrong_solutions`` of them). A share with nothing to count is None."""
    right = {"+": 0, "-": 0}
    total = {"+": 0, "-": 0}
    wrong_solutions = found = 0
    for scores, labs in zip(step_scores, labels):
        for s, lab in zip(scores, labs):
            total[lab] += 1
            right[lab] += int((s >= threshold) == (lab == "+"))
        if "-" in labs:
            wrong_solutions += 1
            first_low = next((k for k, s in enumerate(scores) if s < threshold), None)
            found += int(first_low == labs.index("-"))

    def share(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "threshold": threshold,
        "steps": total["+"] + total["-"],
        "plus_steps": total["+"],
        "minus_steps": total["-"],
        "step_accuracy": share(right["+"] + right["-"], total["+"] + total["-"]),
        "plus_accuracy": share(right["+"], total["+"]),
        "minus_accuracy": share(right["-"], total["-"]),
        "solutions": len(labels),
        "wrong_solutions": wrong_solutions,
        "first_error_found": share(found, wrong_solutions),
    }


def manifest_path(out: Path) -> Path:
    return out.with_name(out.stem + ".manifest.json")


def _show(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def run(args: argparse.Namespace) -> int:
    from vlmforge import dist
    from vlmforge.critic.score import StepRequest, aggregate, step_scores
    from vlmforge.files import atomic_write_text, note_example, write_json
    from vlmforge.model.saving import load_vlm

    inp, out = Path(args.input), Path(args.out)
    if not inp.is_file():
        raise UserError(f"--input {inp} is not a file")
    if args.batch_size < 1 or args.max_steps < 1:
        raise UserError(f"--batch-size ({args.batch_size}) and --max-steps ({args.max_steps}) must be >= 1")
    for path in (out, manifest_path(out)):
        if path.exists() and not args.overwrite:
            raise UserError(f"--out: {path} exists; pass --overwrite to write over it, or choose another --out")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a .jsonl file path")
    root = Path(args.image_root) if args.image_root else inp.parent
    if not root.is_dir():
        raise UserError(f"--image-root {root} is not a folder")
    ckpt = Path(args.critic)
    if not ckpt.exists():
        raise UserError(f"--critic {ckpt} does not exist")
    if (ckpt / "final" / "model.safetensors").is_file():  # a run folder
        ckpt = ckpt / "final"
    skipped: dict[str, int] = {}
    examples: dict[str, list] = {}
    solutions = read_solutions(inp, root, args.max_steps, args.strict, args.allow_absolute_paths, skipped, examples)
    device = dist.resolve_device(args.device)
    model, tok, _ = load_vlm(ckpt, overrides=args.overrides, device=str(device))
    scored: list[tuple[Solution, list[float]]] = []
    for a in range(0, len(solutions), args.batch_size):
        chunk = []
        for sol in solutions[a : a + args.batch_size]:
            try:
                sol.images = load_images(sol)
            except BadRow as e:
                if args.strict:
                    raise UserError(f"{sol.where}: {e} (--no-strict skips and counts bad rows)") from None
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                note_example(examples, e.reason, {"where": sol.where, "error": str(e)})
                continue
            chunk.append(sol)
        requests = [StepRequest(s.question, s.images, s.steps) for s in chunk]
        for sol, scores in zip(chunk, step_scores(model, tok, requests, batch_size=args.batch_size)):
            sol.images = []  # decoded images are not kept past their batch
            scored.append((sol, scores))
    lines = []
    for sol, scores in scored:
        row = {"id": sol.id, "steps": sol.steps, "step_scores": [round(s, 6) for s in scores],
               "score": round(aggregate(scores, args.aggregate), 6)}
        if sol.labels is not None:
            row["labels"] = sol.labels
        lines.append(json.dumps(row) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(lines))
    labelled = [(scores, sol.labels) for sol, scores in scored if sol.labels is not None]
    metrics = label_metrics([s for s, _ in labelled], [lab for _, lab in labelled]) if labelled else None
    write_json(manifest_path(out), {
        "stage": "prm-score",
        "inputs": {"input": str(inp.resolve()), "critic": str(ckpt.resolve()), "image_root": str(root.resolve())},
        "settings": {"aggregate": args.aggregate, "batch_size": args.batch_size, "max_steps": args.max_steps,
                     "strict": args.strict, "overrides": list(args.overrides)},
        "counts": {"rows": len(scored) + sum(skipped.values()), "scored": len(scored),
                   "steps": sum(len(s) for _, s in scored), "skipped": sum(skipped.values())},
        "dropped": skipped,
        "dropped_examples": examples,
        "labels": metrics,
        "output": str(out.resolve()),
    })
    print(f"scored {len(scored)} solution(s), {sum(len(s) for _, s in scored)} step(s) -> {out}"
          + (f"; skipped {sum(skipped.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})"
             if skipped else ""))
    if metrics:
        print(f"labels (threshold 0.5): step accuracy {_show(metrics['step_accuracy'])} over {metrics['steps']} steps; "
              f"'+' steps {_show(metrics['plus_accuracy'])} ({metrics['plus_steps']}), "
              f"'-' steps {_show(metrics['minus_accuracy'])} ({metrics['minus_steps']}); first wrong step found "
              f"{_show(metrics['first_error_found'])} of {metrics['wrong_solutions']} wrong solution(s)")
    return 0
