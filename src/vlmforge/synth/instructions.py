"""Instruction conversations in LLaVA's json format.

Record: ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value": str}, ...]}`` with
``<image>`` on its own line at the start of the first human turn. A text-only record has no
``image``; its first human turn starts with the scene described in words instead. Short answers
are asked with LLaVA-1.5's "single word or phrase" suffix and multiple choice with its letter
suffix, the same prompts the evaluation sets use; a reasoning turn (``math``) asks a
``synth.reasoning`` problem with the step-by-step suffix and answers with its gold steps.
"""

from __future__ import annotations

import numpy as np

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.synth import reasoning
from vlmforge.synth.language import (
    MCQ_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    detailed_caption,
    pick,
    positional_caption,
    short_caption,
)
from vlmforge.synth.questions import MCQ_CATEGORIES, ask, format_mcq_prompt, mcq
from vlmforge.synth.world import Scene, SceneSampler

# Turn kinds and how often they are drawn. "math" (worked counting-and-arithmetic solutions) is
# off in the built-in mix, so worlds made without it keep their SFT data byte for byte (a zero
# weight last draws the same kinds); recipes/demo/world.yaml turns it on.
TURN_WEIGHTS = {
    "color": 0.14,
    "shape": 0.14,
    "count": 0.18,
    "position": 0.14,
    "existence": 0.14,
    "size": 0.06,
    "describe": 0.10,
    "mcq": 0.10,
    "math": 0.0,
}

DESCRIBE_LONG = [
    "Describe the image in detail.",
    "Describe this image.",
    "What do you see in this picture? Describe every shape.",
    "Give a detailed description of the image.",
]
DESCRIBE_SHORT = [
    "Write a short caption for this image.",
    "Briefly describe the image.",
    "What is in this picture?",
]
DESCRIBE_POSITIONS = ["List the shapes in the image and where they are.", "Where are the shapes in this image?"]


def turn(kind: str, scene: Scene, rng: np.random.Generator, world: SceneSampler,
         short_frac: float = 0.5) -> tuple[str, str, str]:
    """(category, human text, gpt text) for one exchange."""
    if kind == "describe":
        r = rng.random()
        if r < 0.45:
            return "describe", pick(rng, DESCRIBE_LONG), detailed_caption(scene, rng)
        if r < 0.75:
            return "describe", pick(rng, DESCRIBE_SHORT), short_caption(scene, rng)
        return "describe", pick(rng, DESCRIBE_POSITIONS), positional_caption(scene, rng)
    if kind == "math":
        p = reasoning.ask(pick(rng, reasoning.categories(world)), scene, rng, world)
        return "math", reasoning.prompt(p.question), reasoning.join(p.steps)
    if kind == "mcq":
        cats = [c for c in MCQ_CATEGORIES if len(_options_of(c, world)) >= 4]
        qa = ask(pick(rng, cats), scene, rng, world)
        options, letter = mcq(qa, rng)
        return "mcq", format_mcq_prompt(qa.question, options, MCQ_SUFFIX), letter
    qa = ask(kind, scene, rng, world)
    if rng.random() < short_frac:
        return qa.category, f"{qa.question}\n{SHORT_ANSWER_SUFFIX}", qa.short
    return qa.category, qa.question, qa.long


def _options_of(category: str, world: SceneSampler) -> list:
    return {
        "color": world.colors,
        "shape": world.shapes,
        "count": list(range(0, max(world.max_objects, 4) + 1)),
        "position": list(range(9)),
    }[category]


def conversation(
    record_id: str,
    image: str | None,
    scene: Scene,
    rng: np.random.Generator,
    world: SceneSampler,
    num_turns: int,
    turn_weights: dict[str, float] | None = None,
    short_answer_frac: float = 0.5,
) -> dict:
    """Questions about ``scene`` with grounded answers. ``image=None``: a text-only conversation
    whose first turn describes the scene (``detailed_caption``: every object's colour, shape, size
    and place) before the first question."""
    lead = f"{IMAGE_TOKEN}\n" if image is not None else f"{detailed_caption(scene, rng)}\n"
    weights = turn_weights or TURN_WEIGHTS
    kinds = list(weights)
    p = np.array([weights[k] for k in kinds], dtype=float)
    convs: list[dict] = []
    categories: list[str] = []
    asked: set[str] = set()
    tries = 0
    while len(categories) < num_turns and tries < 10 * num_turns:
        tries += 1
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        cat, human, gpt = turn(kind, scene, rng, world, short_answer_frac)
        if human in asked:  # no repeated question within a conversation
            continue
        asked.add(human)
        if not convs:
            human = lead + human
        convs += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
        categories.append(cat)
    where = {"image": image} if image is not None else {}
    return {"id": record_id, **where, "conversations": convs, "categories": categories}
