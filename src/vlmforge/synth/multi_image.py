"""Questions that only two images together answer: compare, match or add up what two scenes show.

Families (``CATEGORIES``), one fixed phrasing each so that a tiny LM can learn them:

- more:       "Which image has more circles, the first or the second?" (the counts differ;
              things: a shape, a colour's shapes, or all shapes) -> first | second
- which:      "Which image shows a red circle, the first or the second?" (exactly one of them
              does; a colour and shape, or a shape) -> first | second
- same_color: "Is the triangle in the first image the same color as the triangle in the second
              image?" (exactly one triangle in each) -> yes | no
- both:       "Is there a red circle in both images?" (at least one shows it, so one image alone
              never settles it) -> yes | no
- total:      "How many circles are there in the two images together?" (both show at least one)
              -> an integer

Swapping the two images swaps the answer of ``more`` and ``which`` (``ORDERED``) and keeps the
others. :func:`draw` picks a pair of scenes for a family and a wanted answer (uniform over the
family's answers, so first/second and yes/no are balanced); :func:`conversation` writes an SFT
record with two ``<image>`` lines (``"image": [first, second]``), :func:`eval_row` a multiple-choice
row with ``"images": [first, second]`` (the ``mcq`` kind, built-in task ``synth-multi``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.errors import ConfigError
from vlmforge.synth.language import MCQ_SUFFIX, SHORT_ANSWER_SUFFIX, capitalize, pick, with_article
from vlmforge.synth.questions import format_mcq_prompt
from vlmforge.synth.world import SHAPE_PLURALS, Scene, SceneSampler

CATEGORIES = ("more", "which", "same_color", "both", "total")
ORDERED = ("more", "which")  # families whose answer names an image: swapping the images swaps it
ORDER = ("first", "second")
YES_NO = ("yes", "no")
ANSWERS = {"more": ORDER, "which": ORDER, "same_color": YES_NO, "both": YES_NO}  # total: any count
MCQ_SHARE = 0.2  # share of SFT turns asked as multiple choice (the eval file's format)
PAIR_TRIES = 2000  # second scenes drawn for one question before giving up on the world
NEW_FIRST_EVERY = 50  # ... drawing a new first scene after this many misses in a row


@dataclass(frozen=True)
class PairQA:
    """One question about an ordered pair of scenes and its grounded answer."""

    category: str
    question: str
    answer: str  # "first" | "second" | "yes" | "no" | "3"
    long: str  # the answer in a sentence
    options: tuple[str, ...]  # the family's possible answers (counts: 0 .. 2 * max objects)
    target: str  # what is asked about: "circles", "red circle", "triangle"

    @property
    def short(self) -> str:
        return capitalize(self.answer)


@dataclass(frozen=True)
class _Thing:
    """What ``more`` and ``total`` count: a shape, a colour, or every shape."""

    plural: str
    shape: str | None = None
    color: str | None = None

    def count(self, scene: Scene) -> int:
        return scene.count(self.shape, self.color)


def _things(world: SceneSampler) -> list[_Thing]:
    return ([_Thing(SHAPE_PLURALS[s], shape=s) for s in world.shapes]
            + [_Thing(f"{c} shapes", color=c) for c in world.colors] + [_Thing("shapes")])


def _named(world: SceneSampler) -> list[tuple[str, str | None, str]]:
    """(name, colour, shape) of what ``which`` and ``both`` look for: a colour and shape, or a shape."""
    return ([(f"{c} {s}", c, s) for c in world.colors for s in world.shapes]
            + [(s, None, s) for s in world.shapes])


def _ask_more(a: Scene, b: Scene, world: SceneSampler) -> list[PairQA]:
    out = []
    for t in _things(world):
        na, nb = t.count(a), t.count(b)
        if na != nb:
            which = ORDER[0] if na > nb else ORDER[1]
            out.append(PairQA("more", f"Which image has more {t.plural}, the first or the second?", which,
                              f"The {which} image has more {t.plural}.", ORDER, t.plural))
    return out


def _ask_which(a: Scene, b: Scene, world: SceneSampler) -> list[PairQA]:
    out = []
    for name, color, shape in _named(world):
        ha, hb = a.has(shape, color), b.has(shape, color)
        if ha != hb:
            which = ORDER[0] if ha else ORDER[1]
            out.append(PairQA("which", f"Which image shows {with_article(name)}, the first or the second?", which,
                              f"The {which} image shows {with_article(name)}.", ORDER, name))
    return out


def _ask_same_color(a: Scene, b: Scene, world: SceneSampler) -> list[PairQA]:
    out = []
    for s in world.shapes:
        oa, ob = a.find(shape=s), b.find(shape=s)
        if len(oa) == 1 and len(ob) == 1:
            ca, cb = oa[0].color, ob[0].color
            q = f"Is the {s} in the first image the same color as the {s} in the second image?"
            long = (f"Yes, both {SHAPE_PLURALS[s]} are {ca}." if ca == cb else
                    f"No, the {s} in the first image is {ca} and the {s} in the second image is {cb}.")
            out.append(PairQA("same_color", q, "yes" if ca == cb else "no", long, YES_NO, s))
    return out


def _ask_both(a: Scene, b: Scene, world: SceneSampler) -> list[PairQA]:
    out = []
    for name, color, shape in _named(world):
        ha, hb = a.has(shape, color), b.has(shape, color)
        if not (ha or hb):
            continue  # neither image shows it: either one alone would settle the question
        art = with_article(name)
        if ha and hb:
            long = f"Yes, both images show {art}."
        else:
            long = f"No, only the {ORDER[0] if ha else ORDER[1]} image shows {art}."
        out.append(PairQA("both", f"Is there {art} in both images?", "yes" if ha and hb else "no", long,
                          YES_NO, name))
    return out


def _ask_total(a: Scene, b: Scene, world: SceneSampler) -> list[PairQA]:
    counts = tuple(str(n) for n in range(2 * world.max_objects + 1))
    out = []
    for t in _things(world):
        na, nb = t.count(a), t.count(b)
        if na and nb:
            n = na + nb
            out.append(PairQA("total", f"How many {t.plural} are there in the two images together?", str(n),
                              f"There {'is' if n == 1 else 'are'} {n} {t.plural} in the two images together.",
                              counts, t.plural))
    return out


ASKERS = {"more": _ask_more, "which": _ask_which, "same_color": _ask_same_color, "both": _ask_both,
          "total": _ask_total}


def candidates(category: str, first: Scene, second: Scene, world: SceneSampler) -> list[PairQA]:
    """Every question of ``category`` that the pair answers, with its answer."""
    if category not in ASKERS:
        raise ValueError(f"unknown two-image question family {category!r} (choose from {CATEGORIES})")
    return ASKERS[category](first, second, world)


def draw(category: str, rng: np.random.Generator, world: SceneSampler) -> tuple[Scene, Scene, PairQA]:
    """(first scene, second scene, question): the wanted answer is drawn first (uniform over the
    family's answers), then second scenes until the pair has a question with that answer."""
    want = pick(rng, ANSWERS[category]) if category in ANSWERS else None
    first = world.sample(rng)
    for tries in range(1, PAIR_TRIES + 1):
        second = world.sample(rng)
        found = [q for q in candidates(category, first, second, world) if want is None or q.answer == want]
        if found:
            return first, second, pick(rng, found)
        if tries % NEW_FIRST_EVERY == 0:
            first = world.sample(rng)
    raise ConfigError(f"synth: no pair of scenes answers a two-image {category!r} question with {want!r} "
                      f"after {PAIR_TRIES} draws; widen synth.shapes / synth.colors / synth.max_objects")


def mcq_options(qa: PairQA, rng: np.random.Generator) -> tuple[dict[str, str], str]:
    """Lettered options and the right letter: both answers of a two-way family, or the count and
    three others (its neighbours first) for ``total``; letter positions uniform."""
    if len(qa.options) == 2:
        texts = list(qa.options)
    else:
        n = int(qa.answer)
        near = [str(v) for v in (n - 1, n + 1) if str(v) in qa.options]
        rest = [o for o in qa.options if o != qa.answer and o not in near]
        rng.shuffle(rest)
        texts = [qa.answer, *(near + rest)[:3]]
    order = rng.permutation(len(texts))
    letters = "ABCD"[: len(texts)]
    options = {letters[i]: texts[int(j)] for i, j in enumerate(order)}
    return options, next(k for k, v in options.items() if v == qa.answer)


def turn(qa: PairQA, rng: np.random.Generator, short_frac: float) -> tuple[str, str]:
    """(human text, gpt text) of one exchange: multiple choice (``MCQ_SHARE``), a short answer
    (``short_frac`` of the rest) or a sentence."""
    if rng.random() < MCQ_SHARE:
        options, letter = mcq_options(qa, rng)
        return format_mcq_prompt(qa.question, options, MCQ_SUFFIX), letter
    if rng.random() < short_frac:
        return f"{qa.question}\n{SHORT_ANSWER_SUFFIX}", qa.short
    return qa.question, qa.long


def conversation(record_id: str, images: list[str], first: Scene, second: Scene, qa: PairQA,
                 rng: np.random.Generator, world: SceneSampler, num_turns: int,
                 short_answer_frac: float = 0.5) -> dict:
    """An SFT record about two images (``"image": [first, second]``, two ``<image>`` lines leading
    the first human turn): ``qa`` first, then questions of other families the pair answers."""
    asked = [qa]
    others = [c for c in CATEGORIES if c != qa.category]
    order = rng.permutation(len(others))
    for k in order:
        if len(asked) >= num_turns:
            break
        found = candidates(others[int(k)], first, second, world)
        if found:
            asked.append(pick(rng, found))
    convs = []
    for i, q in enumerate(asked):
        human, gpt = turn(q, rng, short_answer_frac)
        lead = f"{IMAGE_TOKEN}\n" * len(images) if i == 0 else ""
        convs += [{"from": "human", "value": lead + human}, {"from": "gpt", "value": gpt}]
    return {"id": record_id, "image": list(images), "conversations": convs,
            "categories": [f"multi_{q.category}" for q in asked]}


def eval_row(row_id: str, images: list[str], qa: PairQA, rng: np.random.Generator) -> dict:
    """A held-out multiple-choice row (the ``mcq`` kind): ``{id, images, question, options, answer:
    letter, answer_text, category, target, prompt}``."""
    options, letter = mcq_options(qa, rng)
    return {
        "id": row_id,
        "images": list(images),
        "question": qa.question,
        "options": options,
        "answer": letter,
        "answer_text": qa.answer,
        "category": qa.category,
        "target": qa.target,
        "prompt": format_mcq_prompt(qa.question, options, MCQ_SUFFIX),
    }
