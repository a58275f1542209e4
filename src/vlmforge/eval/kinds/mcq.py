"""Multiple choice (SEEDBench, MMStar, AI2D, MMMU style): the option letter, read from the reply.

Row: ``{id, image, question, options: {"A": .., "B": ..} | [..], answer: "B" (or the option text),
hint?, category?}``, or VLMEvalKit's TSV columns ``A``..``Z``. Letter extraction:
``vlmforge.eval.choices``. Supports the likelihood protocol (rank the option texts).
"""

from __future__ import annotations

from vlmforge.eval.choices import answer_letter, extract_option, options_of
from vlmforge.eval.items import RowError, common_item, require
from vlmforge.eval.kind import Kind, mean_accuracy
from vlmforge.eval.prompt_parts import multiple_choice

CIRCULAR_STRIDE = 1_000_000  # VLMEvalKit: circular copy k of question i has index i + k * 1e6


def guessing_accuracy(items) -> float:
    """Expected accuracy of a uniform guess among each item's options."""
    return sum(1.0 / len(it.options) for it in items) / max(1, len(items))


class MCQKind(Kind):
    name = "mcq"
    supports_likelihood = True

    def parse_row(self, row, image_root, where):
        item = common_item(row, image_root, where)
        item.options = options_of(row)
        if len(item.options) < 2:
            raise RowError("a multiple-choice row needs at least 2 options ('options' or columns A, B, ...)")
        item.answer = answer_letter(require(row, "answer"), item.options)
        if row.get("_tsv") and row.get("index") is not None:  # VLMEvalKit circular copies (index >= 1e6)
            idx = int(float(row["index"]))
            item.group = str(idx % CIRCULAR_STRIDE)
            item.meta["rotation"] = idx // CIRCULAR_STRIDE
        return item

    def build_prompt(self, item):
        return multiple_choice(item)

    def extract(self, prediction, item):
        return extract_option(prediction, item.options)

    def score(self, extracted, item):
        return float(extracted == item.answer)

    def aggregate(self, records):
        return mean_accuracy(records)

    def chance(self, items):
        return {"accuracy": guessing_accuracy(items) if items else 0.0}


KIND = MCQKind
