"""The pieces the kinds' prompts are built from (LLaVA-1.5 evaluation style).

A prompt is the question (after its hint, when the row has one), the lettered options for
multiple choice, and one answer-format instruction on the last line.
"""

from __future__ import annotations

# REASONING_SUFFIX (questions solved step by step, ending "The answer is N.") is the synthetic
# world's SFT suffix itself, so that training and evaluation ask with one string.
from vlmforge.synth.language import REASONING_SUFFIX

MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."
INTEGER_SUFFIX = "Answer the question using a single integer number."


__all__ = ["INTEGER_SUFFIX", "MCQ_SUFFIX", "REASONING_SUFFIX", "SHORT_SUFFIX", "float_suffix", "multiple_choice",
           "open_question", "with_hint", "with_options"]


def float_suffix(precision: int | None) -> str:
    if precision is None:
        return "Answer the question using a single number."
    return f"Answer the question using a floating-point number with {precision} decimal place{'s' if precision != 1 else ''}."


def with_hint(item) -> str:
    """The hint (context) line, when there is one, then the question."""
    return f"{item.hint}\n{item.question}" if item.hint else item.question


def with_options(item) -> str:
    """The question, then one ``A. text`` line per option."""
    return "\n".join([with_hint(item), *(f"{letter}. {text}" for letter, text in item.options.items())])


def open_question(item) -> str:
    """The question asked for a short free-form answer (also how the likelihood protocol asks it)."""
    return f"{with_hint(item)}\n{SHORT_SUFFIX}"


def multiple_choice(item) -> str:
    """The question with its options, asking for the option letter."""
    return f"{with_options(item)}\n{MCQ_SUFFIX}"
