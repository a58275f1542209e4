"""Multiple choice (MMBench, SEEDBench, MMStar, AI2D, MMMU style) with optional CircularEval.

Option extraction, first rule that gives exactly one valid letter wins:

1. the whole reply (or its first line) is a letter: ``B``, ``(B)``, ``B.``, ``[B]``, ``b``;
2. an explicit statement: ``the answer is B``, ``Answer: (C)``, ``option D``;
3. the reply starts with a delimited letter: ``A. cat``, ``(B) dog``, ``C: ...``, or with a letter
   followed by that letter's own option text: ``B dog``;
4. exactly one parenthesised letter anywhere: ``... so (C) ...``;
5. exactly one option text occurs in the reply (word-bounded, case-insensitive; when several match,
   a text contained in another matched text is dropped, so "dark red" beats "red").

Anything else (empty, several letters, no option text) is unresolved: scored wrong and counted.

CircularEval (MMBench): a question with n options is asked n times with the option texts rotated;
it counts as right only if every rotation is answered right. Rotations share ``item.group``.
"""

from __future__ import annotations

import re
from collections import defaultdict

from vlmforge.eval.scorers.base import Scored, Scorer, mean_accuracy

_WHOLE = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:)]?")
_STATED = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?[:\-]?\s*[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])")
_LEADING = re.compile(r"^\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.:)](?![A-Za-z]))")
_PAREN = re.compile(r"\(([A-Z])\)")
_LETTER_THEN_TEXT = re.compile(r"([A-Z])\s+(.+)")


def _norm_text(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split())


def _unique(letters: list[str], valid) -> str | None:
    found = {x for x in letters if x in valid}
    return found.pop() if len(found) == 1 else None


def extract_option(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text reply chose, or None if it cannot be told."""
    text = (prediction or "").strip()
    if not text:
        return None
    first_line = text.split("\n", 1)[0].strip()
    m = _WHOLE.fullmatch(text) or _WHOLE.fullmatch(first_line)
    if m:
        letter = m.group(1).upper()
        return letter if letter in options else None
    got = _unique(_STATED.findall(text), options)
    if got:
        return got
    m = _LEADING.match(text)
    if m:
        letter = next(g for g in m.groups() if g)
        if letter in options:
            return letter
    m = _LETTER_THEN_TEXT.match(first_line)
    if m and m.group(1) in options and _norm_text(m.group(2)) == _norm_text(options[m.group(1)]):
        return m.group(1)  # "B dog": the letter followed by its own option text
    got = _unique(_PAREN.findall(text), options)
    if got:
        return got
    return match_option_text(text, options)


def match_option_text(text: str, options: dict[str, str]) -> str | None:
    reply = f" {_norm_text(text)} "
    matched = {k: _norm_text(v) for k, v in options.items() if _norm_text(v) and f" {_norm_text(v)} " in reply}
    if len(matched) > 1:  # drop texts contained in a longer matched text
        matched = {k: v for k, v in matched.items() if not any(v != w and f" {v} " in f" {w} " for w in matched.values())}
    if len(matched) == 1:
        return next(iter(matched))
    return None


def rotate_options(options: dict[str, str], answer: str, shift: int) -> tuple[dict[str, str], str]:
    """Shift option texts by ``shift`` places (letter i gets the text of letter i+shift)."""
    keys = list(options)
    n = len(keys)
    texts = [options[k] for k in keys]
    new = {keys[i]: texts[(i + shift) % n] for i in range(n)}
    old_index = keys.index(answer)
    return new, keys[(old_index - shift) % n]


class MCQScorer(Scorer):
    kind = "mcq"

    def __init__(self, circular: bool = False):
        self.circular = circular
        self.primary = "circular_accuracy" if circular else "accuracy"

    def extract(self, prediction, item):
        return extract_option(prediction, item.options)

    def score(self, extracted, item):
        return float(extracted == item.answer)

    def aggregate(self, records: list[Scored]) -> dict[str, float]:
        if not self.circular:
            return mean_accuracy(records)
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

    def chance(self, items) -> dict[str, float]:
        if not items:
            return {self.primary: 0.0}
        if not self.circular:
            return {"accuracy": sum(1.0 / len(it.options) for it in items) / len(items)}
        sizes: dict[str, int] = defaultdict(int)
        n_opts: dict[str, int] = {}
        for it in items:
            sizes[it.group] += 1
            n_opts[it.group] = len(it.options)
        per_q = [(1.0 / n_opts[g]) ** sizes[g] for g in sizes]
        first = [it for it in items if it.meta.get("rotation", 0) == 0]
        return {
            "circular_accuracy": sum(per_q) / len(per_q),
            "accuracy": sum(1.0 / len(it.options) for it in first) / max(1, len(first)),
        }


__all__ = ["MCQScorer", "extract_option", "match_option_text", "rotate_options"]
