"""Reasoning problems over a scene: count what the question names, then do the arithmetic.

A problem's worked solution is a list of steps (joined by blank lines, the step format of
``vlmforge.critic.steps``): first one step per counted thing ("There are 2 circles." / "There is
1 red shape."), then one step per operation ("2 + 1 = 3." / "2 x 3 = 6."), then "The answer is
N.". Counts are written in digits so the arithmetic reads the same numbers. Families
(``CATEGORIES``), one fixed phrasing each so that a tiny LM can learn them:

- more:     "How many more circles than squares are there?"  (the first has the larger or equal
            count, so the answer may be 0 but is never negative)
- together: "How many circles and squares are there together?"
- sides:    "How many sides do the triangles and squares have in total?"  (triangle 3, square 4:
            ``SIDES``; circles, stars and crosses are never asked about)
- not:      "How many shapes are not red?" / "How many shapes are not circles?"

``wrong_solution`` writes a solution with a known first wrong step (``ERRORS``): a miscount in a
perception step (every later step follows from the wrong count), an arithmetic slip (later steps
follow from the wrong result), or a wrong final answer after right steps; labels are ``+`` before
the first wrong step and ``-`` from it on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmforge.synth.language import REASONING_SUFFIX, join_list, pick
from vlmforge.synth.world import SHAPE_PLURALS, Scene, SceneSampler

CATEGORIES = ("more", "together", "sides", "not")
SIDES = {"triangle": 3, "square": 4}  # the shapes whose sides are asked about, in question order
ERRORS = ("miscount", "arithmetic", "answer", "none")  # how a wrong solution goes wrong ("none": it does not)
STEP_SEPARATOR = "\n\n"  # vlmforge.critic.steps.STEP_SEPARATOR (critic sits above synth)
PLUS, MINUS = "+", "-"  # vlmforge.arch.tokens.PRM_PLUS / PRM_MINUS
_PREFER_BOTH_PRESENT = 0.7  # share of two-thing questions about two things the scene shows
_PREFER_PRESENT = 0.8  # share of "not" questions about something the scene shows


@dataclass(frozen=True)
class Seen:
    """One perception step: how many of a thing the image shows."""

    singular: str  # "circle", "red shape", "shape"
    plural: str
    n: int

    def text(self, n: int | None = None) -> str:
        n = self.n if n is None else n
        return f"There is 1 {self.singular}." if n == 1 else f"There are {n} {self.plural}."


@dataclass(frozen=True)
class Op:
    """One arithmetic step. Operands: ("seen", i) the i-th count, ("op", j) the j-th result,
    ("num", k) the constant k."""

    left: tuple[str, int]
    sym: str  # "+", "-", "x"
    right: tuple[str, int]


@dataclass(frozen=True)
class Problem:
    category: str
    question: str
    seen: tuple[Seen, ...]
    ops: tuple[Op, ...]  # the last result is the answer

    def work(self, counts: list[int] | None = None,
             slip: tuple[int, int] | None = None) -> list[tuple[int, str, int, int]]:
        """(left, sym, right, result) per operation from ``counts`` (default: the true ones);
        ``slip=(j, value)`` writes ``value`` as the j-th result and carries it on."""
        counts = [s.n for s in self.seen] if counts is None else counts
        results: list[int] = []
        rows = []
        for j, op in enumerate(self.ops):
            a, b = (_value(ref, counts, results) for ref in (op.left, op.right))
            r = a + b if op.sym == "+" else a - b if op.sym == "-" else a * b
            if slip is not None and slip[0] == j:
                r = slip[1]
            results.append(r)
            rows.append((a, op.sym, b, r))
        return rows

    @property
    def answer(self) -> int:
        return self.work()[-1][3]

    @property
    def steps(self) -> list[str]:
        """The gold solution."""
        return self.solution()

    def solution(self, counts: list[int] | None = None, slip: tuple[int, int] | None = None,
                 stated: int | None = None) -> list[str]:
        """The steps as ``work(counts, slip)`` computes them, ending in ``stated`` (default: the result)."""
        counts = [s.n for s in self.seen] if counts is None else counts
        rows = self.work(counts, slip)
        stated = rows[-1][3] if stated is None else stated
        return ([s.text(n) for s, n in zip(self.seen, counts)] + [f"{a} {sym} {b} = {r}." for a, sym, b, r in rows]
                + [f"The answer is {stated}."])


def _value(ref: tuple[str, int], counts: list[int], results: list[int]) -> int:
    kind, k = ref
    return counts[k] if kind == "seen" else results[k] if kind == "op" else k


def categories(world: SceneSampler) -> list[str]:
    """The families this world can ask: "sides" needs a triangle or a square in its vocabulary."""
    return [c for c in CATEGORIES if c != "sides" or any(s in world.shapes for s in SIDES)]


def _thing(scene: Scene, kind: str, value: str) -> Seen:
    if kind == "shape":
        return Seen(value, SHAPE_PLURALS[value], scene.count(shape=value))
    return Seen(f"{value} shape", f"{value} shapes", scene.count(color=value))


def _pair(scene: Scene, rng: np.random.Generator, world: SceneSampler, ordered: bool) -> tuple[Seen, Seen]:
    """Two shapes or two colours, the first shown at least once (``ordered``: and at least as
    often as the second); mostly both shown."""
    kind = pick(rng, ["shape", "color"])
    things = [_thing(scene, kind, v) for v in (world.shapes if kind == "shape" else world.colors)]
    pairs = [(x, y) for x in things for y in things
             if x.singular != y.singular and x.n >= max(1, y.n if ordered else 0)]
    both = [(x, y) for x, y in pairs if y.n >= 1]
    pool = both if both and rng.random() < _PREFER_BOTH_PRESENT else pairs
    return pool[int(rng.integers(len(pool)))]


def ask_more(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> Problem:
    x, y = _pair(scene, rng, world, ordered=True)
    return Problem("more", f"How many more {x.plural} than {y.plural} are there?", (x, y),
                   (Op(("seen", 0), "-", ("seen", 1)),))


def ask_together(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> Problem:
    x, y = _pair(scene, rng, world, ordered=False)
    return Problem("together", f"How many {x.plural} and {y.plural} are there together?", (x, y),
                   (Op(("seen", 0), "+", ("seen", 1)),))


def ask_sides(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> Problem:
    shapes = [s for s in SIDES if s in world.shapes]
    if not shapes:
        raise ValueError("a sides question needs a triangle or a square in synth.shapes")
    seen = tuple(_thing(scene, "shape", s) for s in shapes)
    ops = [Op(("seen", i), "x", ("num", SIDES[s])) for i, s in enumerate(shapes)]
    total = ("op", 0)
    for j in range(1, len(shapes)):  # running total of the products
        ops.append(Op(total, "+", ("op", j)))
        total = ("op", len(ops) - 1)
    question = f"How many sides do the {join_list([SHAPE_PLURALS[s] for s in shapes])} have in total?"
    return Problem("sides", question, seen, tuple(ops))


def ask_not(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> Problem:
    kind = pick(rng, ["shape", "color"])
    values = world.shapes if kind == "shape" else world.colors
    present = [v for v in values if _thing(scene, kind, v).n > 0]
    absent = [v for v in values if v not in present]
    value = pick(rng, present) if rng.random() < _PREFER_PRESENT or not absent else pick(rng, absent)
    thing = _thing(scene, kind, value)
    question = f"How many shapes are not {value if kind == 'color' else thing.plural}?"
    total = Seen("shape", "shapes", len(scene.objects))
    return Problem("not", question, (total, thing), (Op(("seen", 0), "-", ("seen", 1)),))


ASKERS = {"more": ask_more, "together": ask_together, "sides": ask_sides, "not": ask_not}


def ask(category: str, scene: Scene, rng: np.random.Generator, world: SceneSampler) -> Problem:
    return ASKERS[category](scene, rng, world)


def prompt(question: str) -> str:
    """What the model is asked, in SFT and in evaluation (the math kind builds the same text)."""
    return f"{question}\n{REASONING_SUFFIX}"


def join(steps: list[str]) -> str:
    return STEP_SEPARATOR.join(steps)


@dataclass(frozen=True)
class Solution:
    steps: list[str]
    first_wrong: int | None  # index of the first wrong step; None: every step is right
    error: str  # one of ERRORS

    @property
    def labels(self) -> list[str]:
        k = len(self.steps) if self.first_wrong is None else self.first_wrong
        return [PLUS] * k + [MINUS] * (len(self.steps) - k)


def _valid(problem: Problem, counts: list[int], slip: tuple[int, int] | None = None) -> bool:
    """A plausible wrong solution: no negative number anywhere and a different answer."""
    rows = problem.work(counts, slip)
    return min(counts) >= 0 and all(r >= 0 for *_, r in rows) and rows[-1][3] != problem.answer


def wrong_solution(problem: Problem, error: str, rng: np.random.Generator) -> Solution:
    """A solution of ``problem`` that goes wrong as ``error`` says (off by one where it goes wrong)."""
    counts = [s.n for s in problem.seen]
    if error == "none":
        return Solution(problem.steps, None, error)
    if error == "miscount":
        options = [(i, counts[i] + d) for i in range(len(counts)) for d in (-1, 1)]
        options = [(i, n) for i, n in options if _valid(problem, counts[:i] + [n] + counts[i + 1:])]
        i, n = options[int(rng.integers(len(options)))]
        return Solution(problem.solution(counts[:i] + [n] + counts[i + 1:]), i, error)
    if error == "arithmetic":
        rows = problem.work()
        options = [(j, rows[j][3] + d) for j in range(len(rows)) for d in (-1, 1)]
        options = [slip for slip in options if _valid(problem, counts, slip)]
        j, r = options[int(rng.integers(len(options)))]
        return Solution(problem.solution(slip=(j, r)), len(problem.seen) + j, error)
    if error == "answer":
        gold = problem.answer
        stated = gold + 1 if gold == 0 or rng.random() < 0.5 else gold - 1
        steps = problem.solution(stated=stated)
        return Solution(steps, len(steps) - 1, error)
    raise ValueError(f"unknown error kind {error!r} (choose from {ERRORS})")
