"""Questions about a scene with grounded answers, distractors and answer variants.

One ``QA`` feeds every format: SFT turns (short or long answer), multiple choice (distractors),
open VQA (10 reference answers from ``variants``), preference pairs (``long_for(wrong)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vlmforge.synth.language import (
    capitalize,
    count_sentence,
    number_word,
    pick,
    plural,
    with_article,
)
from vlmforge.synth.world import (
    CELL_NAMES,
    CELL_PHRASES,
    CELLS,
    POSITION_NAMES,
    SHAPE_PLURALS,
    SIZES,
    Scene,
    SceneSampler,
)

CATEGORIES = ("color", "shape", "count", "position", "existence", "size")
MCQ_CATEGORIES = ("color", "shape", "count", "position")  # what a 4-way question can ask (given 4 values)
_PHRASES = [CELL_PHRASES[c] for c in CELLS]


@dataclass
class QA:
    category: str
    question: str
    answer: str  # canonical short answer, lowercase: "red", "2", "top left", "yes"
    long_for: Callable[[str], str]  # full-sentence answer stating a given value
    options: list[str]  # every value of this kind in the world
    plausible: list[str] = field(default_factory=list)  # wrong values a careless model would pick
    variants: list[str] = field(default_factory=list)  # other correct phrasings (VQA references)
    target: str = ""  # what the question is about, e.g. "red circle"

    @property
    def long(self) -> str:
        return self.long_for(self.answer)

    @property
    def short(self) -> str:
        return capitalize(self.answer)

    def wrong_answers(self) -> list[str]:
        return [o for o in self.options if o != self.answer]


def _unique_shape_objs(scene: Scene):
    return [o for o in scene.objects if scene.count(shape=o.shape) == 1]


def _unique_color_objs(scene: Scene):
    return [o for o in scene.objects if scene.count(color=o.color) == 1]


def _unique_name_objs(scene: Scene):
    return [o for o in scene.objects if scene.count(o.shape, o.color) == 1]


def ask_color(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> QA:
    uniq = _unique_shape_objs(scene)
    if uniq and rng.random() < 0.6:
        o = pick(rng, uniq)
        subj = f"the {o.shape}"
        q = pick(rng, ["What color is {s}?", "What is the color of {s}?", "Which color does {s} have?"]).format(s=subj)
    else:
        o = pick(rng, list(scene.objects))
        subj = f"the shape {o.phrase}"
        q = pick(rng, ["What color is {s}?", "What is the color of {s}?"]).format(s=subj)
    others = [p.color for p in scene.objects if p.color != o.color]
    return QA(
        "color",
        q,
        o.color,
        lambda v, s=subj: f"{capitalize(s)} is {v}.",
        list(world.colors),
        plausible=list(dict.fromkeys(others)),
        variants=[f"{o.color} {o.shape}", o.color],
        target=o.name,
    )


def ask_shape(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> QA:
    uniq = _unique_color_objs(scene)
    if uniq and rng.random() < 0.5:
        o = pick(rng, uniq)
        q = pick(
            rng, ["What shape is the {c} object?", "What is the shape of the {c} object?", "Which shape is {c}?"]
        ).format(c=o.color)
        long_for = lambda v, c=o.color: f"The {c} object is {with_article(v)}."  # noqa: E731
    else:
        o = pick(rng, list(scene.objects))
        q = pick(rng, ["What shape is {p}?", "Which shape can you see {p}?"]).format(p=o.phrase)
        long_for = lambda v, c=o.color, p=o.phrase: f"{capitalize(p)} there is {with_article(c + ' ' + v)}."  # noqa: E731
    others = [p.shape for p in scene.objects if p.shape != o.shape]
    return QA(
        "shape",
        q,
        o.shape,
        long_for,
        list(world.shapes),
        plausible=list(dict.fromkeys(others)),
        variants=[with_article(o.shape), f"{o.color} {o.shape}"],
        target=o.name,
    )


def ask_count(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> QA:
    kind = pick(rng, ["all", "shape", "color", "both"])
    present = rng.random() < 0.75
    src = pick(rng, list(scene.objects))
    shape = color = None
    if kind in ("shape", "both"):
        shape = src.shape if present else pick(rng, list(world.shapes))
    if kind in ("color", "both"):
        color = src.color if present else pick(rng, list(world.colors))
    n = scene.count(shape, color)
    if shape is None:
        sing = f"{color} shape" if color else "shape"
        plur = f"{color} shapes" if color else "shapes"
    else:
        sing = f"{color} {shape}" if color else shape
        plur = f"{color} {SHAPE_PLURALS[shape]}" if color else SHAPE_PLURALS[shape]
    q = pick(
        rng, ["How many {p} are there?", "How many {p} are in the image?", "How many {p} can you see?"]
    ).format(p=plur)
    lo = 1 if kind == "all" else 0
    options = [str(i) for i in range(lo, max(world.max_objects, 4) + 1)]
    ans_noun = plural(shape, n) if shape else ("shape" if n == 1 else "shapes")
    return QA(
        "count",
        q,
        str(n),
        lambda v, s=sing, p=plur: count_sentence(int(v), s, p),
        options,
        plausible=[str(v) for v in (n - 1, n + 1) if str(v) in options],
        variants=[number_word(n), f"{n} {ans_noun}"],
        target=plur,
    )


class Unanswerable(Exception):
    """This scene cannot answer this kind of question unambiguously (ask() falls back to count)."""


def ask_position(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> QA:
    uniq = _unique_name_objs(scene)
    if not uniq:  # e.g. two identical red circles: "where is the red circle?" has no answer
        raise Unanswerable("position")
    o = pick(rng, uniq)
    q = pick(
        rng, ["Where is the {n}?", "Where is the {n} located?", "In which part of the image is the {n}?"]
    ).format(n=o.name)
    phrase = {CELL_NAMES[c]: CELL_PHRASES[c] for c in CELLS}
    corner = o.position in ("top left", "top right", "bottom left", "bottom right")
    variants = [f"{o.position} corner" if corner else f"the {o.position}", f"the {o.position}"]
    if o.position.startswith("top"):
        variants.append(o.position.replace("top", "upper"))
    if o.position.startswith("bottom"):
        variants.append(o.position.replace("bottom", "lower"))
    occupied = [p.position for p in scene.objects if p.position != o.position]
    r, c = o.cell
    neighbours = [CELL_NAMES[(r + dr, c + dc)] for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)) if (r + dr, c + dc) in CELL_NAMES]
    return QA(
        "position",
        q,
        o.position,
        lambda v, n=o.name: f"The {n} is {phrase[v]}.",
        list(POSITION_NAMES),
        plausible=list(dict.fromkeys(occupied + neighbours)),
        variants=variants,
        target=o.name,
    )


def absent_objects(scene: Scene, world: SceneSampler, related_only: bool = False) -> list[str]:
    """'color shape' names not in the scene; related_only keeps those sharing a colour or shape
    with something present (POPE's adversarial negatives)."""
    out = []
    for c in world.colors:
        for s in world.shapes:
            if scene.has(s, c):
                continue
            if related_only and not (scene.has(shape=s) or scene.has(color=c)):
                continue
            out.append(f"{c} {s}")
    return out


def ask_existence(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> QA:
    yes = rng.random() < 0.5
    mode = pick(rng, ["object", "object", "shape", "color"])
    if mode == "object":
        if yes:
            o = pick(rng, list(scene.objects))
            target = o.name
        else:
            pool = absent_objects(scene, world, related_only=rng.random() < 0.5) or absent_objects(scene, world)
            target = pick(rng, pool)
        q = pick(rng, ["Is there {t} in the image?", "Is there {t} in this picture?", "Can you see {t}?"]).format(
            t=with_article(target)
        )
        c, s = target.split(" ")
        n = scene.count(s, c)
        # For an absent target the "yes" sentence is a hallucination (used as a rejected answer).
        where = scene.find(s, c)[0].phrase if n == 1 else pick(rng, _PHRASES)
        yes_long = (
            f"Yes, there are {number_word(n)} {c} {SHAPE_PLURALS[s]}."
            if n > 1
            else f"Yes, there is {with_article(target)} {where}."
        )
        no_long = f"No, there is no {target} in the image."
    elif mode == "shape":
        present = [o.shape for o in scene.objects]
        absent = [s for s in world.shapes if s not in present]
        s = pick(rng, present) if (yes or not absent) else pick(rng, absent)
        target = s
        q = pick(rng, ["Is there {a} in the image?", "Are there any {p} in the image?"]).format(
            a=with_article(s), p=SHAPE_PLURALS[s]
        )
        n = max(1, scene.count(shape=s))
        yes_long = f"Yes, there {'is' if n == 1 else 'are'} {number_word(n)} {plural(s, n)}."
        no_long = f"No, there are no {SHAPE_PLURALS[s]} in the image."
    else:
        present = [o.color for o in scene.objects]
        absent = [c for c in world.colors if c not in present]
        c = pick(rng, present) if (yes or not absent) else pick(rng, absent)
        target = c
        q = pick(rng, ["Is there anything {c} in the image?", "Is there {a} shape in the image?"]).format(
            c=c, a=with_article(c)
        )
        n = max(1, scene.count(color=c))
        yes_long = f"Yes, there {'is' if n == 1 else 'are'} {number_word(n)} {c} {'shape' if n == 1 else 'shapes'}."
        no_long = f"No, there is nothing {c} in the image."
    truth = "yes" if scene.has(*_split_target(target, world)) else "no"
    longs = {"yes": yes_long, "no": no_long}
    return QA(
        "existence",
        q,
        truth,
        lambda v, lg=longs: lg[v],
        ["yes", "no"],
        plausible=["no" if truth == "yes" else "yes"],
        variants=[truth],
        target=target,
    )


def _split_target(target: str, world: SceneSampler) -> tuple[str | None, str | None]:
    """'red circle' -> (shape, color) for Scene.count/has."""
    parts = target.split(" ")
    shape = next((p for p in parts if p in world.shapes), None)
    color = next((p for p in parts if p in world.colors), None)
    return shape, color


def ask_size(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> QA:
    uniq = _unique_name_objs(scene)
    if uniq and rng.random() < 0.7:
        o = pick(rng, uniq)
        subj = f"the {o.name}"
    else:  # the cell always identifies one object
        o = pick(rng, list(scene.objects))
        subj = f"the shape {o.phrase}"
    q = pick(rng, ["Is {n} large or small?", "What size is {n}?", "Is {n} small or large?"]).format(n=subj)
    return QA(
        "size",
        q,
        o.size,
        lambda v, n=subj: f"{capitalize(n)} is {v}.",
        list(SIZES),
        plausible=[s for s in SIZES if s != o.size],
        variants=[o.size, f"{o.size} {o.shape}"],
        target=o.name,
    )



ASKERS: dict[str, Callable[[Scene, np.random.Generator, SceneSampler], QA]] = {
    "color": ask_color,
    "shape": ask_shape,
    "count": ask_count,
    "position": ask_position,
    "existence": ask_existence,
    "size": ask_size,
}


def ask(category: str, scene: Scene, rng: np.random.Generator, world: SceneSampler) -> QA:
    try:
        return ASKERS[category](scene, rng, world)
    except Unanswerable:
        return ask_count(scene, rng, world)


def choose_distractors(qa: QA, rng: np.random.Generator, k: int = 3) -> list[str]:
    """k wrong options: plausible ones first (shuffled), then others; never the answer."""
    plausible = [p for p in qa.plausible if p != qa.answer]
    rest = [o for o in qa.wrong_answers() if o not in plausible]
    rng.shuffle(plausible)
    rng.shuffle(rest)
    # At most 2 "plausible" so an option set is not always the scene's own objects.
    chosen = plausible[:2]
    chosen += [o for o in rest + plausible[2:] if o not in chosen][: k - len(chosen)]
    return chosen[:k]


def mcq(qa: QA, rng: np.random.Generator) -> tuple[dict[str, str], str]:
    """Options {A..D} and the correct letter (letter position uniform)."""
    opts = choose_distractors(qa, rng, 3) + [qa.answer]
    if len(opts) < 4:
        raise ValueError(f"not enough options for a 4-way {qa.category} question")
    order = rng.permutation(4)
    letters = "ABCD"
    options = {letters[i]: opts[j] for i, j in enumerate(order)}
    answer = next(letter for letter, v in options.items() if v == qa.answer)
    return options, answer


def format_mcq_prompt(question: str, options: dict[str, str], suffix: str) -> str:
    lines = [question] + [f"{k}. {v}" for k, v in options.items()] + [suffix]
    return "\n".join(lines)


def vqa_answers(qa: QA, rng: np.random.Generator, n: int = 10) -> list[str]:
    """n annotator answers: mostly the canonical answer, some paraphrases, rarely a wrong one
    (as in VQAv2); the canonical answer always has >= 4 votes, so a correct model scores 1."""
    out = []
    variants = [v for v in qa.variants if v != qa.answer] or [qa.answer]
    wrong = qa.plausible or qa.wrong_answers()
    for _ in range(n):
        r = rng.random()
        out.append(qa.answer if r < 0.65 else pick(rng, variants) if r < 0.95 else pick(rng, wrong))
    for i in range(n):
        if out.count(qa.answer) >= 4:
            break
        if out[i] != qa.answer:
            out[i] = qa.answer
    return out
