"""MMBench: multiple choice with CircularEval (right only if every option rotation is right).

Rows as for ``mcq``. A question with n options is asked n times with the option texts rotated;
the rotations share ``item.group``. A VLMEvalKit circular TSV holds the rotations as rows already
(index + k * 1e6); otherwise ``prepare`` adds them.
"""

from __future__ import annotations

from collections import defaultdict

from vlmforge.eval.items import EvalItem
from vlmforge.eval.kind import Scored, mean_accuracy
from vlmforge.eval.kinds.mcq import MCQKind, guessing_accuracy


def rotate_options(options: dict[str, str], answer: str, shift: int) -> tuple[dict[str, str], str]:
    """Shift option texts by ``shift`` places (letter i gets the text of letter i+shift)."""
    keys = list(options)
    n = len(keys)
    texts = [options[k] for k in keys]
    new = {keys[i]: texts[(i + shift) % n] for i in range(n)}
    old_index = keys.index(answer)
    return new, keys[(old_index - shift) % n]


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


class MMBenchKind(MCQKind):
    name = "mmbench"
    aliases = ("mcq-circular",)
    primary = "circular_accuracy"

    def prepare(self, items):
        return expand_circular(items)

    def aggregate(self, records):
        groups: dict[str, list[Scored]] = defaultdict(list)
        for r in records:
            groups[r.item.group].append(r)
        # Collapse each group to one record whose score is 1 only if every rotation is right.
        collapsed = [
            Scored(item=rs[0].item, prediction="", extracted=None, score=float(all(r.score == 1.0 for r in rs)))
            for rs in groups.values()
        ]
        out = mean_accuracy(collapsed, "circular_accuracy")
        first = [r for r in records if r.item.meta.get("rotation", 0) == 0]
        out["accuracy"] = sum(r.score for r in first) / len(first) if first else 0.0
        out["accuracy_all_rotations"] = sum(r.score for r in records) / len(records) if records else 0.0
        out["n_questions"] = len(groups)
        return out

    def chance(self, items):
        if not items:
            return {self.primary: 0.0}
        sizes: dict[str, int] = defaultdict(int)
        n_opts: dict[str, int] = {}
        for it in items:
            sizes[it.group] += 1
            n_opts[it.group] = len(it.options)
        per_q = [(1.0 / n_opts[g]) ** sizes[g] for g in sizes]
        return {"circular_accuracy": sum(per_q) / len(per_q), "accuracy": guessing_accuracy([it for it in items if it.meta.get("rotation", 0) == 0])}


KIND = MMBenchKind
