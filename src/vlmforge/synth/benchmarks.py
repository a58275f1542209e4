"""Held-out evaluation rows: multiple choice, open VQA (10 references), POPE yes/no.

Rows refer to images by a path relative to the jsonl file's folder. Schemas:

- mcq:  {id, image, question, options: {A,B,C,D}, answer: letter, category, prompt}
- vqa:  {id, image, question, answers: [10 strings], answer: canonical, category, prompt}
- pope: {id, image, question, answer: "yes"|"no", object, sampling: random|popular|adversarial, prompt}
- math: {id, image, question, answer: "7", answer_type: "integer", question_type: "free_form",
  solve: "steps", category, steps: [gold steps], prompt} (MathVista's fields; ``synth.reasoning``)
- math_steps: {id, image, question, prompt, answer, steps, labels: ["+"|"-" per step], first_wrong:
  int | None, category, error}: a solution with a known first wrong step (``answer`` is the right one)

``prompt`` is the ready model input (LLaVA-1.5 style suffixes); ``question`` is the bare question.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from vlmforge.synth import reasoning
from vlmforge.synth.language import MCQ_SUFFIX, SHORT_ANSWER_SUFFIX, with_article
from vlmforge.synth.questions import absent_objects, ask, format_mcq_prompt, mcq, vqa_answers
from vlmforge.synth.world import Scene, SceneSampler

VQA_CATEGORIES = ("color", "shape", "count", "position", "existence")
POPE_SAMPLINGS = ("random", "popular", "adversarial")


def mcq_row(row_id: str, image: str, scene: Scene, category: str, rng, world: SceneSampler) -> dict:
    qa = ask(category, scene, rng, world)
    options, letter = mcq(qa, rng)
    return {
        "id": row_id,
        "image": image,
        "question": qa.question,
        "options": options,
        "answer": letter,
        "category": qa.category,  # may differ from the asked one if the scene cannot answer it
        "prompt": format_mcq_prompt(qa.question, options, MCQ_SUFFIX),
    }


def vqa_row(row_id: str, image: str, scene: Scene, category: str, rng, world: SceneSampler) -> dict:
    qa = ask(category, scene, rng, world)
    return {
        "id": row_id,
        "image": image,
        "question": qa.question,
        "answers": vqa_answers(qa, rng),
        "answer": qa.answer,
        "category": qa.category,  # may differ from the asked one if the scene cannot answer it
        "prompt": f"{qa.question}\n{SHORT_ANSWER_SUFFIX}",
    }


def pope_rows(
    row_prefix: str,
    image: str,
    scene: Scene,
    sampling: str,
    per_image: int,
    rng: np.random.Generator,
    world: SceneSampler,
    popularity: Counter,
) -> list[dict]:
    """``per_image`` present objects (yes) and as many absent ones (no), POPE style: negatives
    drawn at random, by popularity in the training data, or sharing a colour/shape with the scene."""
    present = list(dict.fromkeys(o.name for o in scene.objects))
    order = rng.permutation(len(present))
    yes = [present[i] for i in order[:per_image]]
    if sampling == "adversarial":
        pool = absent_objects(scene, world, related_only=True) or absent_objects(scene, world)
    else:
        pool = absent_objects(scene, world)
    if sampling == "popular":
        pool = sorted(pool, key=lambda n: (-popularity[n], n))[: max(per_image, 3)]
    idx = rng.choice(len(pool), size=min(per_image, len(pool)), replace=False)
    no = [pool[i] for i in idx]
    if len(yes) != len(no):
        raise ValueError("scene too small for balanced POPE questions")
    rows = []
    items = [(n, "yes") for n in yes] + [(n, "no") for n in no]
    for j in rng.permutation(len(items)):
        name, ans = items[int(j)]
        q = f"Is there {with_article(name)} in the image?"
        rows.append(
            {
                "id": f"{row_prefix}-{len(rows)}",
                "image": image,
                "question": q,
                "answer": ans,
                "object": name,
                "sampling": sampling,
                "prompt": f"{q}\n{SHORT_ANSWER_SUFFIX}",
            }
        )
    return rows


def math_row(row_id: str, image: str, scene: Scene, category: str, rng, world: SceneSampler) -> dict:
    p = reasoning.ask(category, scene, rng, world)
    return {
        "id": row_id,
        "image": image,
        "question": p.question,
        "answer": str(p.answer),
        "answer_type": "integer",
        "question_type": "free_form",
        "solve": "steps",
        "category": p.category,
        "steps": p.steps,
        "prompt": reasoning.prompt(p.question),
    }


def math_steps_row(row_id: str, image: str, scene: Scene, category: str, error: str, rng,
                   world: SceneSampler) -> dict:
    p = reasoning.ask(category, scene, rng, world)
    s = reasoning.wrong_solution(p, error, rng)
    return {
        "id": row_id,
        "image": image,
        "question": p.question,
        "prompt": reasoning.prompt(p.question),
        "answer": str(p.answer),
        "steps": s.steps,
        "labels": s.labels,
        "first_wrong": s.first_wrong,
        "category": p.category,
        "error": s.error,
    }
