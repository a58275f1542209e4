"""Solutions as steps, and the conversation a process reward model reads (VisualPRM's format).

A solution is cut into steps on blank lines and merged to at most ``max_steps`` (VisualPRM: 12)
by joining neighbours evenly, so a long solution keeps its order and every step stays whole.

The critic's conversation: a system prompt, a first user turn ``### Question:\\n{question}\\n\\n###
Solution Process:\\n{step 1}``, each later user turn one step, each assistant turn the verdict
``+`` or ``-`` on the step before it. The question is what the policy was asked (its user turn
without the image markers); the images lead the first user turn as ``<image>`` lines.
"""

from __future__ import annotations

import re
from typing import Sequence

from vlmforge.arch.tokens import IMAGE_TOKEN, PRM_MINUS, PRM_PLUS

MAX_STEPS = 12
STEP_SEPARATOR = "\n\n"
PRM_SYSTEM_PROMPT = (
    "You check solutions step by step. The user gives a question about an image and the steps of "
    "a solution, one step per turn. Reply + if the step is correct and follows from the steps "
    "before it, and - if it is wrong."
)
_BLANK_LINES = re.compile(r"\n\s*\n")


def split_steps(solution: str, max_steps: int = MAX_STEPS) -> list[str]:
    """The steps of ``solution``: cut on blank lines (empty pieces dropped, each step stripped),
    then merged to at most ``max_steps`` by joining runs of neighbours with blank lines, the first
    runs one longer when the count does not divide. A text without blank lines is one step; an
    empty text has none."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    steps = [s.strip() for s in _BLANK_LINES.split(solution or "")]
    steps = [s for s in steps if s]
    if len(steps) <= max_steps:
        return steps
    base, extra = divmod(len(steps), max_steps)
    merged, start = [], 0
    for g in range(max_steps):
        size = base + (1 if g < extra else 0)
        merged.append(STEP_SEPARATOR.join(steps[start : start + size]))
        start += size
    return merged


def join_steps(steps: Sequence[str]) -> str:
    """The solution text of ``steps`` (inverse of :func:`split_steps` for steps without blank lines)."""
    return STEP_SEPARATOR.join(steps)


def step_prefix(steps: Sequence[str], n: int) -> str:
    """The reply text through step ``n`` (1-based), ending in the separator, so that a policy asked
    to continue it starts the next step (Monte Carlo rollouts)."""
    return join_steps(steps[:n]) + STEP_SEPARATOR


def critic_question(messages: Sequence[dict]) -> str:
    """The question a critic is shown: the last user turn's text without its image markers."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", "")).replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()
    raise ValueError("no user turn in the messages")


def critic_messages(question: str, steps: Sequence[str], labels: Sequence[str] | None = None,
                    n_images: int = 1) -> list[dict]:
    """The critic's chat messages for ``steps``: ``labels`` (``+``/``-`` per step) as the assistant
    turns, or ``+`` everywhere when None (the placeholder reply scoring reads P('+') against)."""
    if not steps:
        raise ValueError("a solution needs at least one step")
    labels = [PRM_PLUS] * len(steps) if labels is None else list(labels)
    if len(labels) != len(steps):
        raise ValueError(f"{len(labels)} labels for {len(steps)} steps")
    bad = [x for x in labels if x not in (PRM_PLUS, PRM_MINUS)]
    if bad:
        raise ValueError(f"labels must be {PRM_PLUS!r} or {PRM_MINUS!r}, got {bad[0]!r}")
    markers = f"{IMAGE_TOKEN}\n" * n_images
    out = [{"role": "system", "content": PRM_SYSTEM_PROMPT}]
    for i, (step, label) in enumerate(zip(steps, labels)):
        text = f"{markers}### Question:\n{question}\n\n### Solution Process:\n{step}" if i == 0 else step
        out += [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
    return out


def critic_record(record_id: str, image: str | list[str] | None, question: str, steps: Sequence[str],
                  labels: Sequence[str]) -> dict:
    """One training row in LLaVA's json (VisualPRM400K's conversations): ``from`` system / human /
    gpt, what ``vlmforge sft-index`` reads."""
    images = [] if image is None else [image] if isinstance(image, str) else list(image)
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    convs = [{"from": roles[m["role"]], "value": m["content"]}
             for m in critic_messages(question, steps, labels, n_images=len(images))]
    row: dict = {"id": record_id}
    if images:
        row["image"] = images[0] if len(images) == 1 else images
    row["conversations"] = convs
    return row
