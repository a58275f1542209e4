"""Options of multiple-choice rows, and the option a free-text reply chose (mcq, mmbench, math).

Option extraction, first rule that gives exactly one valid letter wins:

1. the whole reply (or its first line) is a letter: ``B``, ``(B)``, ``B.``, ``[B]``, ``b``;
2. an explicit statement: ``the answer is B``, ``Answer: (C)``, ``option D``;
3. the reply starts with a delimited letter: ``A. cat``, ``(B) dog``, ``C: ...``, or with a letter
   followed by that letter's own option text: ``B dog``;
4. exactly one parenthesised letter anywhere: ``... so (C) ...``;
5. exactly one option text occurs in the reply (word-bounded, case-insensitive; when several match,
   a text contained in another matched text is dropped, so "dark red" beats "red").

Anything else (empty, several letters, no option text) is unresolved: scored wrong and counted.
"""

from __future__ import annotations

import re
import string

from vlmforge.eval.items import RowError, literal

_WHOLE = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:)]?")
_STATED = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?[:\-]?\s*[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])")
_LEADING = re.compile(r"^\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.:)](?![A-Za-z]))")
_PAREN = re.compile(r"\(([A-Z])\)")
_LETTER_THEN_TEXT = re.compile(r"([A-Z])\s+(.+)")


def _norm_text(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split())


def _unique(letters: list[str], valid) -> str | None:
    found = {x for x in letters if x in valid}
    return found.pop() if len(found) == 1 else None


def extract_option(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text reply chose, or None if it cannot be told."""
    text = (prediction or "").strip()
    if not text:
        return None
    first_line = text.split("\n", 1)[0].strip()
    m = _WHOLE.fullmatch(text) or _WHOLE.fullmatch(first_line)
    if m:
        letter = m.group(1).upper()
        return letter if letter in options else None
    got = _unique(_STATED.findall(text), options)
    if got:
        return got
    m = _LEADING.match(text)
    if m:
        letter = next(g for g in m.groups() if g)
        if letter in options:
            return letter
    m = _LETTER_THEN_TEXT.match(first_line)
    if m and m.group(1) in options and _norm_text(m.group(2)) == _norm_text(options[m.group(1)]):
        return m.group(1)  # "B dog": the letter followed by its own option text
    got = _unique(_PAREN.findall(text), options)
    if got:
        return got
    return match_option_text(text, options)


def match_option_text(text: str, options: dict[str, str]) -> str | None:
    reply = f" {_norm_text(text)} "
    matched = {k: _norm_text(v) for k, v in options.items() if _norm_text(v) and f" {_norm_text(v)} " in reply}
    if len(matched) > 1:  # drop texts contained in a longer matched text
        matched = {k: v for k, v in matched.items() if not any(v != w and f" {v} " in f" {w} " for w in matched.values())}
    if len(matched) == 1:
        return next(iter(matched))
    return None


def lettered(texts) -> dict[str, str]:
    """Option texts keyed A, B, C, ... in order."""
    return {string.ascii_uppercase[i]: str(v) for i, v in enumerate(texts)}


def options_of(row: dict) -> dict[str, str]:
    """A row's options: ``options`` as a mapping or a list, else VLMEvalKit's columns A, B, ..."""
    opts = literal(row.get("options"))
    if isinstance(opts, dict):
        return {str(k).strip(): str(v) for k, v in opts.items() if v is not None}
    if isinstance(opts, list):
        return lettered(opts)
    # VLMEvalKit: option columns A, B, C, ... (empty cells for questions with fewer options)
    cols = {}
    for letter in string.ascii_uppercase:
        if row.get(letter) is None:
            break
        cols[letter] = str(row[letter])
    return cols


def answer_letter(answer, options: dict[str, str]) -> str:
    """The option letter a reference answer names (the letter, in any case, or the option text)."""
    ans = str(answer).strip()
    if ans in options:
        return ans
    if ans.upper() in options and len(ans) == 1:
        return ans.upper()
    for letter, text in options.items():  # answer given as the option text
        if text.strip().lower() == ans.lower():
            return letter
    raise RowError(f"answer {ans!r} is neither an option letter ({''.join(options)}) nor an option text")
