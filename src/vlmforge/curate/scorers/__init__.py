"""Scorers for ``curate score``: each turns a batch of (image, caption) pairs into score columns.

A scorer has ``prepare(images, captions) -> batch`` (runs in DataLoader workers: preprocessing
only, no model) and ``score(batch) -> dict[column, np.ndarray]`` (runs in the main process;
``score`` is the column filters use by default). ``info()`` goes into the manifest.
"""

from __future__ import annotations

SCORERS = ("clip", "dfn", "mlm")


def load_scorer(name: str, score_cfg):
    from vlmforge.errors import UserError

    if not score_cfg.model:
        raise UserError(f"scorer {name!r} needs a model: --model DIR (or --set curate.score.model=...)")
    if name in ("clip", "dfn"):
        from vlmforge.curate.scorers.clip import ContrastiveScorer

        return ContrastiveScorer(score_cfg.model, device=score_cfg.device, dtype=score_cfg.dtype,
                                 trust_remote_code=score_cfg.trust_remote_code, name=name,
                                 save_embeddings=score_cfg.save_embeddings)
    if name == "mlm":
        from vlmforge.curate.scorers.mlm import MLMJudgeScorer

        return MLMJudgeScorer(score_cfg.model, device=score_cfg.device, metrics=list(score_cfg.mlm_metrics),
                              max_new_tokens=score_cfg.mlm_max_new_tokens, score_from=score_cfg.mlm_score)
    raise UserError(f"unknown scorer {name!r} (choose from {', '.join(SCORERS)})")


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
