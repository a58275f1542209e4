"""A plain-text corpus about the same world (text-only mixing, tokenizer training).

One document per line: descriptions of imagined scenes, question-answer prose and general
facts about the shapes, colours and layout.
"""

from __future__ import annotations

import numpy as np

from vlmforge.synth.language import (
    capitalize,
    caption,
    detailed_caption,
    number_word,
    pick,
    with_article,
)
from vlmforge.synth.questions import ask
from vlmforge.synth.world import CELL_PHRASES, SHAPE_PLURALS, SceneSampler

SHAPE_FACTS = {
    "circle": ["A circle is round and has no corners.", "A circle looks the same from every side."],
    "square": ["A square has four equal sides and four corners.", "Every corner of a square is a right angle."],
    "triangle": ["A triangle has three sides and three corners.", "A triangle can point up like a roof."],
    "star": ["A star has five points.", "A star has points that stick out like rays."],
    "cross": ["A cross has four arms.", "A cross looks like a plus sign."],
}
COLOR_FACTS = {
    "red": "Red is the color of a ripe tomato.",
    "green": "Green is the color of fresh grass.",
    "blue": "Blue is the color of a clear sky.",
    "yellow": "Yellow is the color of a lemon.",
    "purple": "Purple is a mix of red and blue.",
    "orange": "Orange is a mix of red and yellow.",
    "black": "Black is the darkest color.",
    "pink": "Pink is a light red.",
}


def fact(rng: np.random.Generator, world: SceneSampler) -> str:
    r = rng.random()
    if r < 0.35:
        return pick(rng, SHAPE_FACTS[pick(rng, world.shapes)])
    if r < 0.55:
        return COLOR_FACTS[pick(rng, world.colors)]
    if r < 0.8:
        a, b = rng.choice(len(CELL_PHRASES), size=2, replace=False)
        pa, pb = list(CELL_PHRASES.values())[a], list(CELL_PHRASES.values())[b]
        s, c = pick(rng, world.shapes), pick(rng, world.colors)
        return f"If {with_article(c + ' ' + s)} is {pa}, it is not {pb}."
    n = int(rng.integers(2, 5))
    s = pick(rng, world.shapes)
    return f"{capitalize(number_word(n))} {SHAPE_PLURALS[s]} are more than one {s}."


def document(rng: np.random.Generator, world: SceneSampler) -> str:
    r = rng.random()
    scene = world.sample(rng)
    if r < 0.35:
        return f"{pick(rng, ['Imagine a picture.', 'Picture this.', 'Here is a scene.'])} {caption(scene, rng)}"
    if r < 0.6:
        return detailed_caption(scene, rng)
    if r < 0.85:
        qa = ask(pick(rng, ["color", "shape", "count", "position", "existence"]), scene, rng, world)
        return f"{caption(scene, rng)} Question: {qa.question} Answer: {qa.long}"
    return " ".join(fact(rng, world) for _ in range(int(rng.integers(1, 4))))


def corpus_lines(n: int, rng: np.random.Generator, world: SceneSampler) -> list[str]:
    return [document(rng, world) for _ in range(n)]
