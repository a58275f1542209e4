"""Chat turns for the model: image markers, then the query in its kind's prompt format."""

from __future__ import annotations

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.eval.kinds import get_kind


def question_text(kind: str, item, likelihood: bool = False) -> str:
    """The text of one query (no image markers), as kind ``kind`` asks it; with ``likelihood`` as
    the likelihood protocol asks it (no option list)."""
    rules = get_kind(kind)
    return rules.likelihood_prompt(item) if likelihood else rules.build_prompt(item)


def user_turn(kind: str, item, likelihood: bool = False) -> dict:
    """A user message: one image marker per image of the item (before the text), then the query.
    A query that holds exactly one ``<image>`` marker per image (interleaved, MMMU style) keeps
    them where they are; other markers in it are dropped (as ``lmms_adapter.user_messages`` does)."""
    text = question_text(kind, item, likelihood)
    if item.images and text.count(IMAGE_TOKEN) == len(item.images):
        return {"role": "user", "content": text}
    markers = "".join(f"{IMAGE_TOKEN}\n" for _ in item.images)
    return {"role": "user", "content": markers + text.replace(IMAGE_TOKEN, "").lstrip("\n")}
