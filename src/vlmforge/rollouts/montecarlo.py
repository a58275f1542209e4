"""Monte Carlo step labels (VisualPRM, after Math-Shepherd), as a pure function over a policy.

For each question, ``solutions`` replies are sampled and cut into steps (``critic.steps.split_steps``:
blank lines, merged to at most ``max_steps``). For every step i but the last, the policy continues
the reply prefix through step i (``step_prefix``) ``rollouts`` times; the step's ``mc`` is the
fraction of those full replies (prefix + continuation) that the question's judge calls correct.
The last step's prefix is the whole solution, so its ``mc`` is the solution's own correctness
(1.0 or 0.0) and costs nothing. A step is labelled ``+`` when mc > 0 (some continuation from it
still reaches the answer) and ``-`` otherwise.

A prefix that occurs more than once in one question (solutions sharing their first steps, or
identical solutions) is continued once: its continuations' seeds come from the question, the
prefix's text and the continuation's number, not from the solution it came from, so the result is
the same as continuing it again, and duplicates cost nothing.

Every generation has its own seed (solution k: the run's seed, the question's id and k), so what a
question gets does not depend on the batch it shares or the rank it runs on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from vlmforge.arch.tokens import PRM_MINUS, PRM_PLUS
from vlmforge.critic.steps import MAX_STEPS, split_steps, step_prefix


class Policy(Protocol):
    def __call__(self, prompts: list[list[dict]], images: list[list], prefixes: list[str],
                 seeds: list[int]) -> list[str]:
        """Per row: the assistant reply to chat ``prompts[i]`` (``images[i]`` fill its ``<image>``
        markers) that starts with ``prefixes[i]`` ("" = a fresh reply), sampled with ``seeds[i]``;
        returns the continuation only (the text after the prefix)."""


# A full reply -> (judged correct, the answer read from it)
Judge = Callable[[str], tuple[bool, Any]]


@dataclass(frozen=True)
class Ask:
    """One question: ``key`` (its id, unique in the run) seeds its generations."""

    key: str
    messages: list[dict]
    images: list
    judge: Judge


@dataclass
class Solution:
    """Sampled solution ``k`` of a question; no steps when the reply was empty (not labelled)."""

    k: int
    text: str
    steps: list[str]
    correct: bool
    extracted: Any
    mc: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


@dataclass
class Cost:
    """Generations run, and the continuations a repeated prefix did not have to run."""

    solutions: int = 0
    rollouts: int = 0
    rollouts_deduplicated: int = 0

    def add(self, other: Cost) -> None:
        self.solutions += other.solutions
        self.rollouts += other.rollouts
        self.rollouts_deduplicated += other.rollouts_deduplicated


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def solution_seed(seed: int, key: str, k: int) -> int:
    """The sampling seed of solution ``k`` of question ``key``."""
    return _seed(seed, key, "solution", k)


def rollout_seed(seed: int, key: str, prefix: str, j: int) -> int:
    """The sampling seed of continuation ``j`` of ``prefix`` in question ``key``."""
    return _seed(seed, key, "rollout", hashlib.sha256(prefix.encode()).hexdigest(), j)


def mc_label(mc: float) -> str:
    return PRM_PLUS if mc > 0 else PRM_MINUS


@dataclass(frozen=True)
class _Row:
    ask: int  # index into the asks
    prefix: str
    seed: int


def _generate(policy: Policy, asks: Sequence[Ask], rows: list[_Row], batch_size: int, bar) -> list[str]:
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        texts = policy([asks[r.ask].messages for r in chunk], [list(asks[r.ask].images) for r in chunk],
                       [r.prefix for r in chunk], [r.seed for r in chunk])
        if len(texts) != len(chunk):
            raise RuntimeError(f"the policy returned {len(texts)} replies for {len(chunk)} prompts")
        out.extend(texts)
        if bar is not None:
            bar.update(len(chunk))
    return out


def label_questions(
    asks: Sequence[Ask], policy: Policy, *, solutions: int = 4, rollouts: int = 8, max_steps: int = MAX_STEPS,
    seed: int = 0, batch_size: int = 64, bar=None,
) -> tuple[list[list[Solution]], Cost]:
    """Per question, its ``solutions`` sampled solutions with steps, mc and labels; and what it cost.

    All solutions are generated first, then every distinct prefix's continuations, ``batch_size``
    rows per policy call. ``bar`` (optional, tqdm-like): updated per generation; its total grows
    by the continuations once they are known."""
    cost = Cost()
    rows = [_Row(a, "", solution_seed(seed, ask.key, k)) for a, ask in enumerate(asks) for k in range(solutions)]
    texts = _generate(policy, asks, rows, batch_size, bar)
    cost.solutions = len(rows)
    out: list[list[Solution]] = []
    todo: list[_Row] = []
    wanted: list[dict[str, int]] = []  # per question: prefix -> its first row in todo
    for a, ask in enumerate(asks):
        mine: dict[str, int] = {}
        sols = []
        for k in range(solutions):
            text = texts[a * solutions + k]
            correct, extracted = ask.judge(text)
            sol = Solution(k, text, split_steps(text, max_steps), bool(correct), extracted)
            for i in range(1, len(sol.steps)):
                prefix = step_prefix(sol.steps, i)
                if prefix in mine:
                    cost.rollouts_deduplicated += rollouts
                    continue
                mine[prefix] = len(todo)
                todo += [_Row(a, prefix, rollout_seed(seed, ask.key, prefix, j)) for j in range(rollouts)]
            sols.append(sol)
        out.append(sols)
        wanted.append(mine)
    if bar is not None and todo:
        bar.total = (bar.total or 0) + len(todo)
        bar.refresh()
    # Similar prefix lengths share a call: less padding, and the long continuations of short
    # prefixes finish together. Each row's own seed makes the order irrelevant to the result.
    order = sorted(range(len(todo)), key=lambda i: len(todo[i].prefix))
    continued = _generate(policy, asks, [todo[i] for i in order], batch_size, bar)
    cont = [""] * len(todo)
    for i, text in zip(order, continued):
        cont[i] = text
    cost.rollouts = len(todo)
    for a, ask in enumerate(asks):
        mc_of = {}
        for prefix, first in wanted[a].items():
            hits = sum(bool(ask.judge(prefix + cont[first + j])[0]) for j in range(rollouts))
            mc_of[prefix] = hits / rollouts
        for sol in out[a]:
            if not sol.steps:
                continue
            sol.mc = [mc_of[step_prefix(sol.steps, i)] for i in range(1, len(sol.steps))] + [float(sol.correct)]
            sol.labels = [mc_label(v) for v in sol.mc]
    return out, cost
