"""What every evaluation kind provides, and the record a scored prediction becomes.

A kind is one module in ``vlmforge/eval/kinds/`` whose ``KIND`` is a ``Kind`` subclass: it turns a
file row into an ``EvalItem`` (``parse_row``), asks it (``build_prompt``), reads and scores the
reply (``extract``, ``score``), and turns records into metrics and chance levels (``aggregate``,
``chance``). Scoring is rule-based (no external judge).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmforge.eval.items import EvalItem
from vlmforge.eval.prompt_parts import open_question


@dataclass
class Scored:
    """One prediction after scoring. ``extracted`` is None when no answer could be read from it."""

    item: Any  # vlmforge.eval.items.EvalItem
    prediction: str
    extracted: Any
    score: float  # 1.0 right / 0.0 wrong; VQA accuracy may be fractional


class Kind:
    """The rules of one task kind: rows -> items -> prompts -> scores -> metrics.

    ``extract`` reads the answer from a free-text prediction (None = unresolved, scored wrong and
    counted); ``score`` compares it with the item's reference; ``aggregate`` turns records into
    metrics; ``chance`` gives the score of guessing, for "before/after vs chance" reports.
    """

    name: str = ""  # what task specs call the kind (``KIND:PATH``)
    aliases: tuple[str, ...] = ()  # other names for the same kind
    primary: str = "accuracy"  # the headline metric in results.json
    # Multiple choice whose option texts can be ranked by the model's likelihood (``likelihood``
    # protocol): items have ``options`` and are asked as open questions (``likelihood_prompt``).
    supports_likelihood: bool = False

    def parse_row(self, row: dict, image_root: Path, where: str) -> EvalItem:
        """Validate one row and build its item; raises ``RowError`` naming what is wrong."""
        raise NotImplementedError

    def prepare(self, items: list[EvalItem]) -> list[EvalItem]:
        """The items as asked, after ``--limit`` (e.g. CircularEval adds the rotations)."""
        return items

    def build_prompt(self, item: EvalItem) -> str:
        """The text of one query (no image markers): question, options, answer-format instruction."""
        raise NotImplementedError

    def likelihood_prompt(self, item: EvalItem) -> str:
        """The query when the option texts are ranked by likelihood: no option list."""
        return open_question(item)

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
