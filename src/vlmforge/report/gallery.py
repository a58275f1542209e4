"""A gallery of examples as HTML cards: a thumbnail, the question, and answers side by side."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from vlmforge.report.builder import data_uri

# A reply longer than this is cut in the card; the whole reply is one click away.
SHORT_REPLY = 60


@dataclass
class Answer:
    label: str  # e.g. "after SFT"
    text: str
    correct: bool | None = None  # None: no mark (the gold answer)
    extracted: str = ""  # what the scorer read from a long reply


@dataclass
class Card:
    question: str
    answers: list[Answer]
    image: Path | None = None
    caption: str = ""  # small line over the question, e.g. the task and category
    options: str = ""
    tag: str = ""
    tag_class: str = ""  # CSS class of the tag (fixed, broke, right, wrong)


def _answer_html(a: Answer) -> str:
    mark = "" if a.correct is None else (' <span class="ok">✓</span>' if a.correct else ' <span class="bad">✗</span>')
    text = a.text.strip() or "(empty reply)"
    if len(text) > SHORT_REPLY:
        shown = a.extracted or text[:SHORT_REPLY] + "…"
        body = (f"{html.escape(shown)}{mark}<details><summary>whole reply</summary>"
                f'<div class="reply">{html.escape(text)}</div></details>')
    else:
        body = f"{html.escape(text)}{mark}"
    return f"<dt>{html.escape(a.label)}</dt><dd>{body}</dd>"


def card_html(card: Card) -> str:
    parts = []
    if card.image is not None and Path(card.image).is_file():
        parts.append(f'<img class="thumb" src="{data_uri(card.image)}" alt="{html.escape(Path(card.image).name)}">')
    if card.tag:
        parts.append(f'<span class="tag {html.escape(card.tag_class)}">{html.escape(card.tag)}</span> ')
    if card.caption:
        parts.append(f'<small>{html.escape(card.caption)}</small>')
    parts.append(f'<div class="q">{html.escape(card.question)}</div>')
    if card.options:
        parts.append(f'<div class="opts">{html.escape(card.options)}</div>')
    parts.append("<dl>" + "".join(_answer_html(a) for a in card.answers) + "</dl>")
    return '<div class="card">' + "".join(parts) + "</div>"


def gallery_html(cards: list[Card]) -> str:
    return '<div class="gallery">' + "\n".join(card_html(c) for c in cards) + "</div>"
