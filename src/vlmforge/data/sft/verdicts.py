"""A process reward model's replies in SFT data: the ``+`` / ``-`` verdict tokens, and the mask that
supervises only them.

In a critic conversation (vlmforge.critic.steps) every assistant turn is the verdict on the step
before it. Stage ``prm`` trains the verdict token of each turn and not its closing ``<|im_end|>``:
the critic is read as P('+') against P('-') at that one position, never asked to end a turn.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vlmforge.arch.tokens import IM_END, PRM_MINUS, PRM_PLUS
from vlmforge.errors import UserError


class VerdictError(ValueError):
    """An assistant turn of a critic conversation that is not one verdict token."""


def verdict_ids(tokenizer) -> tuple[int, int]:
    """The token ids of ``+`` and ``-``; UserError when either is not exactly one token."""
    out = []
    for text in (PRM_PLUS, PRM_MINUS):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise UserError(f"tokenizer {name} encodes the verdict {text!r} as {len(ids)} tokens {ids}; a process "
                            f"reward model needs {PRM_PLUS!r} and {PRM_MINUS!r} to be one token each")
        out.append(int(ids[0]))
    return out[0], out[1]


def end_of_turn_ids(tokenizer) -> set[int]:
    """Tokens that may close a reply inside an assistant span: the special tokens and ``<|im_end|>``."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(end, int) and end >= 0:
        ids.add(end)
    return ids


def assistant_spans(mask: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of 1s in an assistant mask (one run per assistant turn)."""
    m = np.asarray(mask, dtype=bool)
    if not m.size:
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def verdict_mask(tokenizer, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray,
                 verdicts: tuple[int, int], end_ids: set[int] | None = None) -> np.ndarray:
    """The assistant ``mask`` cut to the first token of each assistant turn, the verdict.

    Every turn must be exactly one verdict token followed only by end-of-turn tokens; otherwise
    :class:`VerdictError` naming the turn and its reply."""
    ids = np.asarray(ids, dtype=np.int64)
    end_ids = end_of_turn_ids(tokenizer) if end_ids is None else end_ids
    out = np.zeros(ids.size, dtype=bool)
    for k, (a, b) in enumerate(assistant_spans(mask)):
        rest = ids[a + 1 : b]
        if int(ids[a]) not in verdicts or any(int(t) not in end_ids for t in rest):
            reply = tokenizer.decode([int(t) for t in ids[a:b] if int(t) not in end_ids])
            raise VerdictError(f"assistant turn {k + 1} replies {reply!r}, not one {PRM_PLUS!r} or {PRM_MINUS!r} token")
        out[a] = True
    return out
