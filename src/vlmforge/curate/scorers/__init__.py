"""Scorers for ``curate score``: each turns a batch of (image, caption) pairs into score columns.

A scorer has ``prepare(images, captions) -> batch`` (runs in DataLoader workers: preprocessing
only, no model) and ``score(batch) -> dict[column, np.ndarray]`` (runs in the main process;
``score`` is the column filters use by default). ``info()`` goes into the manifest. One module
per scorer class; its ``names`` are the ``--scorer`` values it answers to and ``from_config``
builds it from ``curate.score``. The registry below is derived from those classes.
"""

from __future__ import annotations

from vlmforge.config.curate import ScoreConfig
from vlmforge.curate.scorers.clip import ContrastiveScorer
from vlmforge.curate.scorers.mlm import MLMJudgeScorer
from vlmforge.errors import UserError

SCORER_CLASSES = {name: cls for cls in (ContrastiveScorer, MLMJudgeScorer) for name in cls.names}
SCORERS = tuple(SCORER_CLASSES)


def load_scorer(name: str, score_cfg: ScoreConfig):
    if not score_cfg.model:
        raise UserError(f"scorer {name!r} needs a model: --model DIR (or --set curate.score.model=...)")
    if name not in SCORER_CLASSES:
        raise UserError(f"unknown scorer {name!r} (choose from {', '.join(SCORERS)})")
    return SCORER_CLASSES[name].from_config(name, score_cfg)
