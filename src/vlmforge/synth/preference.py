"""Preference pairs: a grounded answer (chosen) vs a fluent hallucination (rejected).

Row: {id, image, prompt, chosen, rejected, category, error}; ``prompt`` starts with ``<image>\\n``.
Rejected descriptions describe a minimally edited scene (one colour, shape, position or count
changed), so the pair differs only in what the image can decide.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.synth.instructions import DESCRIBE_LONG
from vlmforge.synth.language import SHORT_ANSWER_SUFFIX, capitalize, detailed_caption, pick
from vlmforge.synth.questions import ask, choose_distractors
from vlmforge.synth.world import CELLS, SIZES, Obj, Scene, SceneSampler

QA_CATEGORIES = ("color", "shape", "count", "position", "existence")


def perturb_scene(scene: Scene, rng: np.random.Generator, world: SceneSampler) -> tuple[Scene, str]:
    """A scene that differs from ``scene`` in exactly one visible way; returns (scene, error kind)."""
    objs = list(scene.objects)
    free = [c for c in CELLS if c not in {o.cell for o in objs}]
    kinds = ["color", "shape", "position"]
    if free and len(objs) < 9:
        kinds.append("added_object")
    if len(objs) > 1:
        kinds.append("removed_object")
    kind = pick(rng, kinds)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if kind == "color":
        objs[i] = replace(o, color=pick(rng, [c for c in world.colors if c != o.color]))
    elif kind == "shape":
        objs[i] = replace(o, shape=pick(rng, [s for s in world.shapes if s != o.shape]))
    elif kind == "position" and free:
        objs[i] = replace(o, cell=pick(rng, free))
    elif kind == "position":  # grid full: swap with another object's cell is impossible to see; recolor
        kind = "color"
        objs[i] = replace(o, color=pick(rng, [c for c in world.colors if c != o.color]))
    elif kind == "added_object":
        objs.append(
            Obj(pick(rng, list(world.shapes)), pick(rng, list(world.colors)), pick(rng, list(SIZES)), pick(rng, free))
        )
    else:
        objs.pop(i)
    objs.sort(key=lambda x: x.cell)
    return replace(scene, objects=tuple(objs)), kind


def preference_row(row_id: str, image: str, scene: Scene, rng: np.random.Generator, world: SceneSampler) -> dict:
    if rng.random() < 0.5:
        wrong_scene, err = perturb_scene(scene, rng, world)
        detail_rng_seed = int(rng.integers(2**31))
        # Same sentence choices for both, so the texts differ only where the scenes do.
        chosen = detailed_caption(scene, np.random.default_rng(detail_rng_seed))
        rejected = detailed_caption(wrong_scene, np.random.default_rng(detail_rng_seed))
        return {
            "id": row_id,
            "image": image,
            "prompt": f"{IMAGE_TOKEN}\n{pick(rng, DESCRIBE_LONG)}",
            "chosen": chosen,
            "rejected": rejected,
            "category": "describe",
            "error": err,
        }
    category = pick(rng, list(QA_CATEGORIES))
    qa = ask(category, scene, rng, world)
    wrong = choose_distractors(qa, rng, 1)[0]
    short = rng.random() < 0.3
    return {
        "id": row_id,
        "image": image,
        "prompt": f"{IMAGE_TOKEN}\n{qa.question}" + (f"\n{SHORT_ANSWER_SUFFIX}" if short else ""),
        "chosen": qa.short if short else qa.long,
        "rejected": capitalize(wrong) if short else qa.long_for(wrong),
        "category": category,
        "error": f"wrong_{category}",
    }
