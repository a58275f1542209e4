"""Grammatical, varied captions grounded in a scene (templates + small English helpers)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from vlmforge.synth.world import NUMBER_WORDS, SHAPE_PLURALS, Obj, Scene

# LLaVA-1.5's prompt suffixes: short answers and multiple choice are asked this way in training
# and evaluation, so a model learns when to answer in one word.
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
# Questions solved step by step (synth.reasoning): defined here once, for the SFT turns and for the
# math kind's prompt (vlmforge.eval.prompt_parts imports it), so both ask with the same words.
REASONING_SUFFIX = 'Solve it step by step, then end with "The answer is N." where N is the number.'


def pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else SHAPE_PLURALS[shape]


def capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


def join_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def counted(n: int, noun_phrase_singular: str, noun_phrase_plural: str) -> str:
    """'one red circle' / 'a red circle' / 'two red circles'."""
    if n == 1:
        return with_article(noun_phrase_singular)
    return f"{number_word(n)} {noun_phrase_plural}"


def obj_phrase(o: Obj, with_size: bool = True) -> str:
    """'large red circle' (no article)."""
    return f"{o.size} {o.color} {o.shape}" if with_size else f"{o.color} {o.shape}"


def groups(scene: Scene) -> list[tuple[str, str, int]]:
    """(color, shape, count) in reading order of first appearance."""
    c = Counter((o.color, o.shape) for o in scene.objects)
    seen: list[tuple[str, str]] = []
    for o in scene.objects:
        if (o.color, o.shape) not in seen:
            seen.append((o.color, o.shape))
    return [(col, sh, c[(col, sh)]) for col, sh in seen]


def grouped_list(scene: Scene, rng: np.random.Generator) -> str:
    """'two red circles and a blue square' (sizes mentioned for single objects, sometimes)."""
    size_of = {(o.color, o.shape): o.size for o in scene.objects}
    parts = []
    use_size = rng.random() < 0.5
    for col, sh, n in groups(scene):
        if n == 1:
            p = f"{size_of[(col, sh)]} {col} {sh}" if use_size else f"{col} {sh}"
            parts.append(with_article(p))
        else:
            parts.append(f"{number_word(n)} {col} {SHAPE_PLURALS[sh]}")
    return join_list(parts)


def positioned_list(scene: Scene, rng: np.random.Generator, with_size: bool | None = None) -> str:
    """'a large red circle in the top left corner and a blue square at the bottom'."""
    if with_size is None:
        with_size = rng.random() < 0.6
    return join_list([f"{with_article(obj_phrase(o, with_size))} {o.phrase}" for o in scene.objects])


def there_be(n: int) -> str:
    return "there is" if n == 1 else "there are"


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    lst = grouped_list(scene, rng)
    templates = [
        "{L}.",
        "A picture of {l}.",
        "An image of {l}.",
        "A simple drawing of {l}.",
        "{L} on a light background.",
        "{There} {l}.",
        "This image shows {l}.",
        "A light background with {l}.",
    ]
    t = pick(rng, templates)
    # "there is a red circle and two squares" / "there are two squares and a red circle"
    There = capitalize(there_be(groups(scene)[0][2]))
    return t.format(L=capitalize(lst), l=lst, There=There)


def positional_caption(scene: Scene, rng: np.random.Generator) -> str:
    n = len(scene.objects)
    lst = positioned_list(scene, rng)
    templates = [
        "{L}.",
        "In this image {there} {l}.",
        "The picture shows {l}.",
        "{N} {shapes}: {l}.",
        "An image with {n} {shapes}: {l}.",
    ]
    t = pick(rng, templates)
    return t.format(
        L=capitalize(lst),
        l=lst,
        there="there is",  # the list starts with "a ...": "there is a red circle and a blue star"
        N=capitalize(number_word(n)),
        n=number_word(n),
        shapes="shape" if n == 1 else "shapes",
    )


def detailed_caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Long description: total count, then one sentence per object. Deterministic if rng is None."""
    n = len(scene.objects)
    first = (
        "The image shows one shape on a light background."
        if n == 1
        else f"The image shows {number_word(n)} shapes on a light background."
    )
    sents = [first]
    for o in scene.objects:
        if rng is not None and rng.random() < 0.5:
            sents.append(f"{capitalize(o.phrase)} there is {with_article(obj_phrase(o))}.")
        else:
            lead = "The" if sum(p.color == o.color and p.shape == o.shape for p in scene.objects) == 1 else "A"
            if lead == "A":
                sents.append(f"{capitalize(with_article(obj_phrase(o)))} is {o.phrase}.")
            else:
                sents.append(f"The {o.color} {o.shape} is {o.size} and sits {o.phrase}.")
    return " ".join(sents)


def _object_facts(o: Obj, scene: Scene) -> list[str]:
    """Sentences that each state one attribute of ``o`` given others, in every direction
    (shape -> colour, colour -> shape, object -> place, place -> object), so that predicting the
    stated attribute needs the image. Only subjects that pick out this object are used."""
    where, place = o.phrase, capitalize(o.phrase)
    facts = [f"The shape {where} is {o.color}.", f"The shape {where} is {with_article(o.shape)}.",
             f"{place} there is {with_article(obj_phrase(o))}."]
    if scene.count(shape=o.shape) == 1:
        facts += [f"The {o.shape} is {o.color}.", f"The {o.shape} is {where}.", f"The {o.shape} is {o.size}."]
    if scene.count(color=o.color) == 1:
        facts += [f"The {o.color} shape is {with_article(o.shape)}.", f"The {o.color} object is {where}."]
    if scene.count(o.shape, o.color) == 1:
        facts += [f"The {o.color} {o.shape} is {where}.", f"The {o.color} {o.shape} is {o.size}."]
    return facts


def _count_facts(scene: Scene) -> list[str]:
    out = []
    for s in dict.fromkeys(o.shape for o in scene.objects):
        out.append(count_sentence(scene.count(shape=s), s, SHAPE_PLURALS[s]))
    for c in dict.fromkeys(o.color for o in scene.objects):
        out.append(count_sentence(scene.count(color=c), f"{c} shape", f"{c} shapes"))
    return out


def dense_caption(scene: Scene, rng: np.random.Generator, per_object: int = 2) -> str:
    """A dense description (ShareGPT4V-style detail): the number of shapes, then ``per_object``
    facts about each object and the counts per shape and colour, in random order. Each fact names
    an object by one attribute and states another, so next-token prediction on these captions
    exercises looking an object up in the image by colour, shape or place, which short web
    captions ("a red circle ...", always colour before shape) never do."""
    n = len(scene.objects)
    sents = [f"There {'is one shape' if n == 1 else f'are {number_word(n)} shapes'} in the image."]
    facts = []
    for o in scene.objects:
        options = _object_facts(o, scene)
        facts += [options[i] for i in rng.choice(len(options), size=min(per_object, len(options)), replace=False)]
    counts = _count_facts(scene)
    facts += [counts[i] for i in rng.choice(len(counts), size=min(2, len(counts)), replace=False)]
    order = rng.permutation(len(facts))
    return " ".join(sents + [facts[i] for i in order])


CAPTION_STYLES = {"short": short_caption, "positional": positional_caption, "detailed": detailed_caption,
                  "dense": dense_caption}
DEFAULT_CAPTION_MIX = {"short": 0.4, "positional": 0.45, "detailed": 0.15}


def caption(scene: Scene, rng: np.random.Generator, mix: dict[str, float] | None = None) -> str:
    """A caption in one of CAPTION_STYLES, drawn with the weights in ``mix``."""
    mix = mix or DEFAULT_CAPTION_MIX
    r, acc = rng.random() * sum(mix.values()), 0.0
    for style, weight in mix.items():
        acc += weight
        if r < acc:
            return CAPTION_STYLES[style](scene, rng)
    return CAPTION_STYLES[style](scene, rng)  # r rounded up to the sum: the last style


def count_sentence(n: int, singular: str, plural_: str) -> str:
    """'There are no red circles.' / 'There is one red circle.' / 'There are two red circles.'"""
    if n == 0:
        return f"There are no {plural_}."
    if n == 1:
        return f"There is one {singular}."
    return f"There are {number_word(n)} {plural_}."
