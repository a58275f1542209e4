"""POPE (object hallucination): yes/no extraction; accuracy, precision, recall, F1 (yes = positive), yes-ratio.

Row: ``{id, image, question, answer: "yes"|"no", object?, category? or sampling?}``; metrics are
also reported per ``category`` (the negative-sampling split: random / popular / adversarial).

Extraction reads the first sentence: ``yes`` if it says yes and has no negation, ``no`` if it says
no/not (as the LLaVA POPE script does), otherwise unresolved. An unresolved reply is wrong for
accuracy and is not a "yes" prediction (so it lowers recall on positive questions, never precision);
the count is reported.
"""

from __future__ import annotations

import re

from vlmforge.eval.items import RowError, common_item, require
from vlmforge.eval.kind import Kind, Scored
from vlmforge.eval.prompt_parts import open_question

_NEG = {"no", "not", "none", "nope", "isn't", "aren't", "doesn't", "don't", "cannot", "can't"}
_POS = {"yes", "yeah", "yep", "true", "correct"}


def extract_yes_no(prediction: str) -> str | None:
    text = (prediction or "").strip().lower()
    first = re.split(r"[.\n!?]", text, maxsplit=1)[0]
    words = set(re.findall(r"[a-z']+", first))
    if words & _NEG:
        return "no"
    if words & _POS:
        return "yes"
    return None


def pope_metrics(pred: list[str | None], gold: list[str]) -> dict[str, float]:
    """Confusion-matrix metrics with yes as the positive class (None = unresolved)."""
    n = len(gold)
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gold))
    tn = sum(p == "no" and g == "no" for p, g in zip(pred, gold))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(pred, gold))  # includes unresolved positives
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in pred) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


class POPEKind(Kind):
    name = "pope"
    primary = "f1"

    def parse_row(self, row, image_root, where):
        item = common_item(row, image_root, where)
        if "category" not in item.meta and "sampling" in item.meta:
            item.meta["category"] = item.meta["sampling"]  # POPE reports per negative-sampling split
        ans = str(require(row, "answer")).strip().lower()
        if ans not in ("yes", "no"):
            raise RowError(f"POPE answer must be yes or no, got {ans!r}")
        item.answer = ans
        return item

    def build_prompt(self, item):
        return open_question(item)

    def extract(self, prediction, item):
        return extract_yes_no(prediction)

    def score(self, extracted, item):
        return float(extracted == item.answer)

    def aggregate(self, records: list[Scored]) -> dict[str, float]:
        out = pope_metrics([r.extracted for r in records], [r.item.answer for r in records])
        # POPE is usually reported per negative-sampling split (random / popular / adversarial).
        for cat in sorted({str(r.item.meta["category"]) for r in records if r.item.meta.get("category")}):
            sub = [r for r in records if str(r.item.meta.get("category")) == cat]
            m = pope_metrics([r.extracted for r in sub], [r.item.answer for r in sub])
            out.update({f"{k}/{cat}": m[k] for k in ("accuracy", "f1")})
        return out

    def chance(self, items) -> dict[str, float]:
        p = sum(it.answer == "yes" for it in items) / len(items) if items else 0.5
        # Uniform guessing has expected accuracy 0.5; always answering yes gets F1 = 2p / (1 + p).
        return {"accuracy": 0.5, "f1": 2 * p / (1 + p) if p else 0.0}


KIND = POPEKind
