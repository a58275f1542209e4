"""MMPR's two ways of making preference pairs from a model's own answers, as pure functions.

Correctness-based, for questions with a known answer: each sample is judged by the rule-based
scorer of the question's kind (``vlmforge.eval.kinds``: the MCQ letter or option text, VQA
accuracy, yes/no, number). A sample is right when it scores 1 and wrong when it scores 0 (VQA's
partial credit is neither); a sample cut off at the token budget is judged but never paired. A
pair is one right and one wrong sample, distinct texts only, at most k per question. A wrong
sample that still states a right sample's answer ("C, or maybe B" when B is right) is not used:
as a rejected reply it would push the model away from the answer it should give.

Dropout next-token prediction, for long answers nothing can check: the reference answer is
chosen; the model gets the first half of its words without the image and its continuation of
that half is rejected: what the model says from language alone, where it hallucinates.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.eval.answers import normalize_answer
from vlmforge.eval.items import EvalItem
from vlmforge.eval.kind import Kind


@dataclass(frozen=True)
class Sample:
    """One sampled reply; ``finished``: it ended with an end-of-turn token within the token budget."""

    text: str
    finished: bool = True


@dataclass
class QuestionStats:
    """What the samples of one question (or of many, summed) came to."""

    questions: int = 0
    samples: int = 0
    score_sum: float = 0.0  # accuracy of the samples = score_sum / samples
    correct: int = 0  # samples scoring 1
    incorrect: int = 0  # samples scoring 0 (unresolved ones included)
    partial: int = 0  # samples with partial credit (VQA): neither side
    unfinished: int = 0  # cut at the token budget: judged, never paired
    unusable: int = 0  # empty replies, or replies with an <image> marker: never paired
    duplicates: int = 0  # a text an earlier sample of the same question on the same side already had
    negatives_with_answer: int = 0  # distinct wrong texts skipped because they state a right answer
    no_correct: int = 0  # questions without a usable right sample
    no_incorrect: int = 0  # questions without a usable wrong sample
    pairs: int = 0

    def add(self, other: QuestionStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["accuracy"] = self.score_sum / self.samples if self.samples else 0.0
        return out


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def answer_forms(item: EvalItem, extracted) -> list[tuple[str, str]]:
    """How a reply can state the answer ``extracted`` (a kind's extract() result): ("letter", "B")
    and ("text", "blue") for a multiple-choice option, ("text", ...) otherwise."""
    options = item.options or {}
    if isinstance(extracted, str) and extracted in options:
        return [("letter", extracted), ("text", options[extracted])]
    if isinstance(extracted, str) and options:  # math multiple choice extracts the option text
        same = [k for k, v in options.items() if normalize_answer(v) == normalize_answer(extracted)]
        return [("text", extracted)] + [("letter", k) for k in same]
    if isinstance(extracted, (int, float)) and not isinstance(extracted, bool):
        return [("text", _format_number(extracted))]
    return [("text", str(extracted))]


def states(text: str, form: tuple[str, str]) -> bool:
    """Whether ``text`` contains an answer form: a letter standing alone (case kept: "a" is an
    article), or a phrase as whole words after the VQA normalisation."""
    mode, value = form
    if mode == "letter":
        return re.search(rf"(?<![A-Za-z]){re.escape(value)}(?![A-Za-z])", text) is not None
    phrase = normalize_answer(value).lower()
    return bool(phrase) and f" {phrase} " in f" {normalize_answer(text).lower()} "


def correctness_pairs(
    rules: Kind, item: EvalItem, samples: list[Sample | str], max_pairs: int, rng: random.Random,
) -> tuple[list[tuple[str, str]], QuestionStats]:
    """(chosen, rejected) pairs of one question's samples and what the samples came to.

    Right x wrong over distinct texts (in sample order); when there are more than ``max_pairs``
    combinations, ``rng`` picks which (kept in combination order)."""
    stats = QuestionStats(questions=1, samples=len(samples))
    right: dict[str, Any] = {}  # text -> extracted answer
    wrong: list[str] = []
    for s in samples:
        s = s if isinstance(s, Sample) else Sample(str(s))
        scored = rules.score_prediction(s.text, item)
        stats.score_sum += scored.score
        if scored.score >= 1.0:
            stats.correct += 1
        elif scored.score <= 0.0:
            stats.incorrect += 1
        else:
            stats.partial += 1
            continue
        text = s.text.strip()
        if not s.finished:
            stats.unfinished += 1
            continue
        if not text or IMAGE_TOKEN in text:
            stats.unusable += 1
            continue
        if scored.score >= 1.0:
            if text in right:
                stats.duplicates += 1
            else:
                right[text] = scored.extracted
        elif text in wrong:
            stats.duplicates += 1
        else:
            wrong.append(text)
    forms = {f for extracted in right.values() for f in answer_forms(item, extracted)}
    usable = [t for t in wrong if not any(states(t, f) for f in forms)]
    stats.negatives_with_answer = len(wrong) - len(usable)
    stats.no_correct = int(not right)
    stats.no_incorrect = int(not usable)
    combos = [(c, r) for c in right for r in usable]
    if len(combos) > max_pairs:
        combos = [combos[i] for i in sorted(rng.sample(range(len(combos)), max_pairs))]
    stats.pairs = len(combos)
    return combos, stats


def without_image_markers(question: str) -> str:
    """The question text with its ``<image>`` markers (and the newline after each) removed."""
    return question.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()


def with_image_markers(question: str, n_images: int) -> str:
    """One ``<image>`` line per image before the question, as InternVL asks (markers it has stay)."""
    if IMAGE_TOKEN in question or n_images == 0:
        return question
    return f"{IMAGE_TOKEN}\n" * n_images + question


def first_half(answer: str) -> str | None:
    """The first half of the answer's words (rounded down), or None when it has fewer than 2 words."""
    words = answer.split()
    if len(words) < 2:
        return None
    return " ".join(words[: len(words) // 2])
