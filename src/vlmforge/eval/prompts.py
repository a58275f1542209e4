"""Prompt formats per task kind (LLaVA-1.5 evaluation style) and chat messages with image markers."""

from __future__ import annotations

from vlmforge.arch.tokens import IMAGE_TOKEN

MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."
INTEGER_SUFFIX = "Answer the question using a single integer number."


def _float_suffix(precision: int | None) -> str:
    if precision is None:
        return "Answer the question using a single number."
    return f"Answer the question using a floating-point number with {precision} decimal place{'s' if precision != 1 else ''}."


def _with_options(item) -> str:
    lines = [f"{item.hint}\n{item.question}" if item.hint else item.question]
    lines += [f"{letter}. {text}" for letter, text in item.options.items()]
    return "\n".join(lines)


def question_text(kind: str, item) -> str:
    """The text of one query (no image markers): question + options + answer-format instruction."""
    if kind in ("mcq", "mmbench", "mcq-circular"):
        return f"{_with_options(item)}\n{MCQ_SUFFIX}"
    if kind in ("vqa", "pope"):
        q = f"{item.hint}\n{item.question}" if item.hint else item.question
        return f"{q}\n{SHORT_SUFFIX}"
    if kind == "math":
        if item.meta.get("question_type") == "multi_choice" and item.options:
            return f"{_with_options(item)}\n{MCQ_SUFFIX}"
        q = f"{item.hint}\n{item.question}" if item.hint else item.question
        atype = item.meta.get("answer_type")
        if atype == "integer":
            return f"{q}\n{INTEGER_SUFFIX}"
        if atype == "float":
            return f"{q}\n{_float_suffix(item.meta.get('precision'))}"
        return f"{q}\n{SHORT_SUFFIX}"
    raise ValueError(f"no prompt format for kind {kind!r}")


def user_turn(kind: str, item) -> dict:
    """A user message: one image marker per image of the item (before the text), then the query."""
    markers = "".join(f"{IMAGE_TOKEN}\n" for _ in item.images)
    return {"role": "user", "content": markers + question_text(kind, item)}
