"""MathVista style: multiple choice or a number, compared at the task's precision.

Row: ``{id, image, question, answer, question_type?: multi_choice|free_form, choices?: [..],
answer_type?: integer|float|text, precision?: int, unit?, solve?: "steps", steps?: [..]}``. Item
fields: ``meta.question_type`` multi_choice | free_form, ``options`` for choices, ``answer`` (the
choice text or the number as text), ``meta.answer_type`` integer | float | text,
``meta.precision`` (decimal places for floats; default: the number of decimals written in the
reference answer), ``meta.solve`` / ``meta.steps``.

A free-form numeric row with ``solve: "steps"`` (the synthetic world's reasoning task) is asked
for a worked solution ending in "The answer is N." (``REASONING_SUFFIX``) instead of a bare
number; its ``steps`` (the gold solution) are the k-shot demonstration's reply.

Extraction: for choices, the MCQ option extraction (a letter or a choice text) mapped to the
choice text; for numbers, the number after "answer is"/"answer:" when present, else the last
number in the reply (commas in thousands removed); text answers compare after normalisation.
"""

from __future__ import annotations

import re

from vlmforge.critic.steps import join_steps
from vlmforge.eval.answers import normalize_answer
from vlmforge.eval.choices import extract_option, lettered
from vlmforge.eval.items import RowError, common_item, literal, require
from vlmforge.eval.kind import Kind
from vlmforge.eval.prompt_parts import (
    INTEGER_SUFFIX,
    REASONING_SUFFIX,
    SHORT_SUFFIX,
    float_suffix,
    multiple_choice,
    with_hint,
)

_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(rf"(?<![\w.]){_NUM}")
_STATED = re.compile(rf"(?i:answer)\s*(?:(?i:is)\s*)?[:=]?\s*\$?\s*({_NUM})")


def _to_float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_number(prediction: str) -> float | None:
    text = prediction or ""
    for m in _STATED.finditer(text):
        value = _to_float(m.group(1))
        if value is not None:
            return value
    numbers = [n for n in (_to_float(m.group(0)) for m in _NUMBER.finditer(text) if m.group(0).strip("+-")) if n is not None]
    return numbers[-1] if numbers else None


def decimals_of(text: str) -> int:
    s = str(text).strip()
    return len(s.split(".", 1)[1]) if "." in s and s.split(".", 1)[1].isdigit() else 0


def numbers_equal(pred: float, gold: str, answer_type: str, precision: int | None) -> bool:
    ref = _to_float(str(gold))
    if ref is None:
        return False
    if answer_type == "integer":
        return int(round(pred)) == int(round(ref)) and abs(pred - round(pred)) < 1e-9
    digits = decimals_of(gold) if precision is None else int(precision)
    return round(pred, digits) == round(ref, digits)


def guess_answer_type(answer: str) -> str:
    try:
        value = float(answer.replace(",", ""))
    except ValueError:
        return "text"
    return "integer" if value == int(value) and "." not in answer else "float"


def _is_choice(item) -> bool:
    return item.meta.get("question_type") == "multi_choice" and bool(item.options)


class MathKind(Kind):
    name = "math"

    def parse_row(self, row, image_root, where):
        item = common_item(row, image_root, where)
        item.answer = str(require(row, "answer")).strip()
        choices = literal(row.get("choices"))
        if isinstance(choices, list) and choices:
            item.options = lettered(choices)
        qtype = row.get("question_type") or ("multi_choice" if item.options else "free_form")
        if qtype not in ("multi_choice", "free_form"):
            raise RowError(f"question_type must be multi_choice or free_form, got {qtype!r}")
        if qtype == "multi_choice" and not item.options:
            raise RowError("a multi_choice math question needs 'choices'")
        atype = row.get("answer_type") or guess_answer_type(item.answer)
        if atype not in ("integer", "float", "text", "list"):
            raise RowError(f"answer_type must be integer, float or text, got {atype!r}")
        if atype in ("integer", "float") and qtype == "free_form":
            try:
                float(item.answer.replace(",", ""))
            except ValueError:
                raise RowError(f"answer {item.answer!r} is not a number but answer_type is {atype}") from None
        item.meta.update(question_type=qtype, answer_type=atype)
        solve = row.get("solve")
        if solve not in (None, "", "steps"):
            raise RowError(f"solve must be 'steps' (or absent), got {solve!r}")
        if solve == "steps":
            if qtype != "free_form" or atype not in ("integer", "float"):
                raise RowError("solve: steps needs a free_form question with an integer or float answer")
            steps = literal(row.get("steps"))
            if steps is not None and (not isinstance(steps, list) or not all(isinstance(s, str) for s in steps)):
                raise RowError("steps must be a list of strings")
            item.meta["solve"] = "steps"
            if steps:
                item.meta["steps"] = list(steps)
        if row.get("precision") is not None:
            item.meta["precision"] = int(float(row["precision"]))
        return item

    def build_prompt(self, item):
        if _is_choice(item):
            return multiple_choice(item)
        atype = item.meta.get("answer_type")
        if item.meta.get("solve") == "steps":
            return f"{with_hint(item)}\n{REASONING_SUFFIX}"
        if atype == "integer":
            return f"{with_hint(item)}\n{INTEGER_SUFFIX}"
        if atype == "float":
            return f"{with_hint(item)}\n{float_suffix(item.meta.get('precision'))}"
        return f"{with_hint(item)}\n{SHORT_SUFFIX}"

    def extract(self, prediction, item):
        if _is_choice(item):
            letter = extract_option(prediction, item.options)
            return None if letter is None else item.options[letter]
        if item.meta.get("answer_type") in ("integer", "float"):
            return extract_number(prediction)
        text = (prediction or "").strip()
        return text or None

    def score(self, extracted, item):
        gold = str(item.answer)
        if _is_choice(item):
            return float(normalize_answer(str(extracted)) == normalize_answer(gold))
        answer_type = item.meta.get("answer_type")
        if answer_type in ("integer", "float"):
            return float(numbers_equal(float(extracted), gold, answer_type, item.meta.get("precision")))
        return float(normalize_answer(str(extracted)) == normalize_answer(gold))

    def chance(self, items) -> dict[str, float]:
        if not items:
            return {"accuracy": 0.0}
        per = [1.0 / len(it.options) if _is_choice(it) else 0.0 for it in items]
        return {"accuracy": sum(per) / len(per)}

    def demo_answer(self, item) -> str:
        if _is_choice(item):
            for letter, text in item.options.items():
                if normalize_answer(text) == normalize_answer(str(item.answer)):
                    return letter
        if item.meta.get("solve") == "steps":
            steps = item.meta.get("steps")
            return join_steps(steps) if steps else f"The answer is {item.answer}."
        return str(item.answer)


KIND = MathKind
