"""Rule-based scorers, one per task kind. ``make_scorer(kind, **options)`` builds one."""

from __future__ import annotations

from vlmforge.eval.scorers.base import Scored, Scorer
from vlmforge.eval.scorers.math import MathScorer
from vlmforge.eval.scorers.mcq import MCQScorer
from vlmforge.eval.scorers.pope import POPEScorer
from vlmforge.eval.scorers.vqa import VQAScorer

# Task kind -> (scorer class, constructor options). "mmbench" is MCQ with CircularEval.
KINDS = {
    "mcq": (MCQScorer, {}),
    "mmbench": (MCQScorer, {"circular": True}),
    "mcq-circular": (MCQScorer, {"circular": True}),
    "vqa": (VQAScorer, {}),
    "pope": (POPEScorer, {}),
    "math": (MathScorer, {}),
}


def make_scorer(kind: str, **options) -> Scorer:
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r} (known: {', '.join(KINDS)})")
    cls, defaults = KINDS[kind]
    return cls(**{**defaults, **options})


__all__ = ["KINDS", "MCQScorer", "MathScorer", "POPEScorer", "Scored", "Scorer", "VQAScorer", "make_scorer"]
