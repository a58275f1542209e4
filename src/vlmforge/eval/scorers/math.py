"""MathVista style: multiple choice or a number, compared at the task's precision.

Item fields (see tasks.py): ``meta.question_type`` multi_choice | free_form, ``options`` for
choices, ``answer`` (the choice text or the number as text), ``meta.answer_type``
integer | float | text, ``meta.precision`` (decimal places for floats; default: the number of
decimals written in the reference answer).

Extraction: for choices, the MCQ option extraction (a letter or a choice text) mapped to the
choice text; for numbers, the number after "answer is"/"answer:" when present, else the last
number in the reply (commas in thousands removed); text answers compare after normalisation.
"""

from __future__ import annotations

import re

from vlmforge.eval.scorers.base import Scorer
from vlmforge.eval.scorers.mcq import extract_option
from vlmforge.eval.scorers.vqa import normalize_answer

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


class MathScorer(Scorer):
    kind = "math"

    def extract(self, prediction, item):
        if item.meta.get("question_type") == "multi_choice" and item.options:
            letter = extract_option(prediction, item.options)
            return None if letter is None else item.options[letter]
        if item.meta.get("answer_type") in ("integer", "float"):
            return extract_number(prediction)
        text = (prediction or "").strip()
        return text or None

    def score(self, extracted, item):
        gold = str(item.answer)
        if item.meta.get("question_type") == "multi_choice" and item.options:
            return float(normalize_answer(str(extracted)) == normalize_answer(gold))
        answer_type = item.meta.get("answer_type")
        if answer_type in ("integer", "float"):
            return float(numbers_equal(float(extracted), gold, answer_type, item.meta.get("precision")))
        return float(normalize_answer(str(extracted)) == normalize_answer(gold))

    def chance(self, items) -> dict[str, float]:
        if not items:
            return {"accuracy": 0.0}
        per = [1.0 / len(it.options) if it.meta.get("question_type") == "multi_choice" and it.options else 0.0 for it in items]
        return {"accuracy": sum(per) / len(per)}

    def demo_answer(self, item) -> str:
        if item.meta.get("question_type") == "multi_choice" and item.options:
            for letter, text in item.options.items():
                if normalize_answer(text) == normalize_answer(str(item.answer)):
                    return letter
        return str(item.answer)
