"""What every scorer provides, and the record a scored prediction becomes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Scored:
    """One prediction after scoring. ``extracted`` is None when no answer could be read from it."""

    item: Any  # vlmforge.eval.tasks.EvalItem
    prediction: str
    extracted: Any
    score: float  # 1.0 right / 0.0 wrong; VQA accuracy may be fractional


class Scorer:
    """Rule-based scorer for one task kind (no external judge).

    ``extract`` reads the answer from a free-text prediction (None = unresolved, scored wrong and
    counted); ``score`` compares it with the item's reference; ``aggregate`` turns records into
    metrics; ``chance`` gives the score of guessing, for "before/after vs chance" reports.
    """

    kind: str = ""
    primary: str = "accuracy"  # the headline metric in results.json

    def extract(self, prediction: str, item) -> Any:
        raise NotImplementedError

    def score(self, extracted: Any, item) -> float:
        raise NotImplementedError

    def score_prediction(self, prediction: str, item) -> Scored:
        extracted = self.extract(prediction, item)
        score = 0.0 if extracted is None else float(self.score(extracted, item))
        return Scored(item=item, prediction=prediction, extracted=extracted, score=score)

    def aggregate(self, records: list[Scored]) -> dict[str, float]:
        return mean_accuracy(records)

    def chance(self, items: list) -> dict[str, float]:
        raise NotImplementedError

    def demo_answer(self, item) -> str:
        """The assistant turn of a k-shot demonstration built from ``item``."""
        return str(item.answer)


def mean_accuracy(records: list[Scored], name: str = "accuracy") -> dict[str, float]:
    n = len(records)
    out = {name: (sum(r.score for r in records) / n) if n else 0.0}
    # Per-category breakdown when the data has categories (MMBench/SEED/MMStar abilities).
    cats: dict[str, list[float]] = {}
    for r in records:
        cat = r.item.meta.get("category")
        if cat is not None and cat != "":
            cats.setdefault(str(cat), []).append(r.score)
    for cat, scores in sorted(cats.items()):
        out[f"{name}/{cat}"] = sum(scores) / len(scores)
    return out


def count_unresolved(records: list[Scored]) -> int:
    return sum(1 for r in records if r.extracted is None)
