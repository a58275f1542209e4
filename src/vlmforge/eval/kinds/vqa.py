"""Open-ended VQA (TextVQA, VQAv2, GQA, VizWiz, OK-VQA style), scored with the official VQA accuracy.

Row: ``{id, image, question, answers: [10 human answers], answer?: canonical, category?}`` (or only
``answer``: one reference, exact match after normalisation); VQAv2-style
``answers: [{"answer": ..}, ..]`` is accepted too.

Accuracy for one question with human answers h_1..h_n (n = 10 in VQAv2/TextVQA/VizWiz/OK-VQA):
for each i, acc_i = min(1, #{j != i : h_j == prediction} / 3); the score is the mean of acc_i
over the n leave-one-out subsets. With a single reference answer (GQA style) the score is exact
match after normalisation (the leave-one-out formula would give 0 for every prediction).
Normalisation: ``vlmforge.eval.answers``.

One deliberate difference, switchable with ``official_skip_unanimous=True``: the official script
normalises only when the humans disagree (``len(set(answers)) > 1``), relying on pre-normalised
annotations; we always normalise both sides so that raw annotations (our own jsonl files, TSVs)
score the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from vlmforge.eval.answers import clean_text, normalize_answer
from vlmforge.eval.items import RowError, common_item, literal
from vlmforge.eval.kind import Kind, mean_accuracy
from vlmforge.eval.prompt_parts import open_question


def vqa_accuracy(prediction: str, answers: Sequence[str], official_skip_unanimous: bool = False) -> float:
    """min(#matching humans / 3, 1) averaged over the n leave-one-out subsets of the n answers."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    gts = [clean_text(a) for a in answers]
    pred = clean_text(prediction)
    if not (official_skip_unanimous and len(set(gts)) <= 1):
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    pred = pred.lower()
    matches = [g.lower() == pred for g in gts]
    if len(gts) == 1:
        return float(matches[0])
    total = sum(matches)
    # Leaving out answer i removes one match exactly when answer i itself matches.
    accs = [min(1.0, (total - m) / 3.0) for m in matches]
    return sum(accs) / len(accs)


def most_common_answer(answers: Sequence[str]) -> str:
    """The answer most humans gave (after normalisation); ties -> first seen. Used for k-shot demos."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for a in answers:
        key = normalize_answer(a)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, a.strip())
    best = max(counts, key=lambda k: counts[k])  # max keeps the first maximal key (insertion order)
    return first[best]


class VQAKind(Kind):
    name = "vqa"
    primary = "vqa_accuracy"

    def __init__(self, official_skip_unanimous: bool = False):
        self.official_skip_unanimous = official_skip_unanimous

    def parse_row(self, row, image_root, where):
        item = common_item(row, image_root, where)
        answers = literal(row.get("answers", row.get("answer")))
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
        return item

    def build_prompt(self, item):
        return open_question(item)

    def extract(self, prediction, item):
        # Short-answer prompts: the first line is the answer; an empty reply is unresolved.
        text = (prediction or "").strip().split("\n", 1)[0].strip()
        return text or None

    def score(self, extracted, item):
        return vqa_accuracy(extracted, item.answers, self.official_skip_unanimous)

    def aggregate(self, records):
        return mean_accuracy(records, "vqa_accuracy")

    def chance(self, items):
        return {"vqa_accuracy": 0.0}  # guessing a free-form answer essentially never matches

    def demo_answer(self, item):
        return item.answer if item.answer else most_common_answer(item.answers)


KIND = VQAKind
