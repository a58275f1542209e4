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
    """A user message: one image marker per image of the item (before the text), then the query."""
    markers = "".join(f"{IMAGE_TOKEN}\n" for _ in item.images)
    return {"role": "user", "content": markers + question_text(kind, item, likelihood)}
