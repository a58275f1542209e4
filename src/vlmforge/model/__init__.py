"""The vision-language model: vision tower + projector + causal LM, generation, export.

Heavy imports (torch, transformers) happen when these functions are first used.
"""


def build_vlm(*args, **kwargs):
    from vlmforge.model.build import build_vlm as _build

    return _build(*args, **kwargs)


def save_vlm(*args, **kwargs):
    from vlmforge.model.checkpoint import save_vlm as _save

    return _save(*args, **kwargs)


def load_vlm(*args, **kwargs):
    from vlmforge.model.checkpoint import load_vlm as _load

    return _load(*args, **kwargs)


__all__ = ["build_vlm", "load_vlm", "save_vlm"]
