"""The world is grounded: pixels show the scene, and every answer is true of the scene."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from vlmforge.synth.language import NUMBER_WORDS, caption, dense_caption, detailed_caption
from vlmforge.synth.preference import perturb_scene
from vlmforge.synth.questions import CATEGORIES, ask, mcq, vqa_answers
from vlmforge.synth.render import render_scene
from vlmforge.synth.world import CELL_NAMES, CELL_PHRASES, COLORS, SHAPE_PLURALS, SceneSampler

WORLD = SceneSampler(["circle", "square", "triangle", "star"], ["red", "green", "blue", "yellow", "purple", "orange"])
PLURAL_TO_SHAPE = {v: k for k, v in SHAPE_PLURALS.items()}
PHRASE_TO_POS = {p: CELL_NAMES[c] for c, p in CELL_PHRASES.items()}


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(123)
    return [WORLD.sample(rng) for _ in range(300)]


def test_pixels_show_the_scene(scenes):
    for scene in scenes[:100]:
        im = np.asarray(render_scene(scene, 64), dtype=int)
        occupied = set()
        for o in scene.objects:
            r, c = o.cell
            cx, cy = int((c + 0.5 + o.dx) * 64 / 3), int((r + 0.5 + o.dy) * 64 / 3)
            occupied.add(o.cell)
            assert np.abs(im[cy, cx] - np.array(COLORS[o.color])).max() <= 30, (o, im[cy, cx])
        bg = np.asarray(render_scene(replace(scene, objects=()), 64), dtype=int)
        for cell in set(CELL_NAMES) - occupied:  # empty cells are background
            r, c = cell
            y, x = int((r + 0.5) * 64 / 3), int((c + 0.5) * 64 / 3)
            assert (im[y, x] == bg[y, x]).all()
        assert np.abs(bg.mean(axis=(0, 1)) - np.array(scene.background)).max() < 25  # light, around the mean


def test_large_is_larger_than_small():
    from vlmforge.synth.world import Obj, Scene

    def ink(size):
        s = Scene((Obj("circle", "blue", size, (1, 1)),), (255, 255, 255))
        return (np.asarray(render_scene(s, 64)).sum(axis=2) < 600).sum()

    assert ink("large") > 2 * ink("small") > 0


def _resolve(subject: str, objs):
    """'the shape in the top left corner' / 'the red circle' / 'the circle' / 'the red object' /
    'in the top left corner' -> the one object meant."""
    subject = subject.removeprefix("the shape ").removeprefix("the ")
    if subject in PHRASE_TO_POS:
        found = [o for o in objs if o.position == PHRASE_TO_POS[subject]]
    elif subject.endswith((" object", " shape")):
        found = [o for o in objs if o.color == subject.split()[0]]
    elif " " in subject:
        found = [o for o in objs if o.name == subject]
    elif subject in COLORS:
        found = [o for o in objs if o.color == subject]
    else:
        found = [o for o in objs if o.shape == subject]
    assert len(found) == 1, (subject, found)  # questions must be unambiguous
    return found[0]


def _answer_from_scene(question: str, scene) -> str:
    """Answer a generated question independently of the generator, by parsing it."""
    q = question.lower().rstrip("?")
    objs = scene.objects
    if m := re.fullmatch(r"how many (?:(\w+) )?(\w+) (?:are there|are in the image|can you see)", q):
        color, noun = m.group(1), m.group(2)
        shape = PLURAL_TO_SHAPE.get(noun)
        return str(sum((color is None or o.color == color) and (shape is None or o.shape == shape) for o in objs))
    if m := re.fullmatch(r"(?:is (.+) (?:large or small|small or large))|(?:what size is (.+))", q):
        return _resolve(m.group(1) or m.group(2), objs).size
    if m := re.fullmatch(r"(?:where is (.+?)(?: located)?)|(?:in which part of the image is (.+))", q):
        return _resolve(m.group(1) or m.group(2), objs).position
    shapes = "|".join(SHAPE_PLURALS)
    if m := re.fullmatch(rf"(?:is there an?|can you see an?) (\w+) ({shapes})(?: in the image| in this picture)?", q):
        return "yes" if any(o.name == f"{m.group(1)} {m.group(2)}" for o in objs) else "no"
    if m := re.fullmatch(r"(?:is there an? (\w+)|are there any (\w+)) in the image", q):
        word = m.group(1) or m.group(2)
        shape = PLURAL_TO_SHAPE.get(word, word)
        if shape in SHAPE_PLURALS:
            return "yes" if any(o.shape == shape for o in objs) else "no"
    if m := re.fullmatch(r"is there (?:anything (\w+)|an? (\w+) shape) in the image", q):
        color = m.group(1) or m.group(2)
        return "yes" if any(o.color == color for o in objs) else "no"
    if m := re.fullmatch(r"(?:what color is|what is the color of|which color does) (.+?)(?: have)?", q):
        return _resolve(m.group(1), objs).color
    if m := re.fullmatch(r"(?:what shape is|what is the shape of|which shape is|which shape can you see) (.+)", q):
        return _resolve(m.group(1), objs).shape
    raise AssertionError(f"unparsed question: {question}")


def test_answers_are_true_of_the_scene(scenes):
    rng = np.random.default_rng(7)
    checked = {c: 0 for c in CATEGORIES}
    for scene in scenes:
        for cat in CATEGORIES:
            qa = ask(cat, scene, rng, WORLD)
            assert _answer_from_scene(qa.question, scene) == qa.answer, (qa.question, qa.answer, scene.to_dict())
            checked[qa.category] += 1
            assert qa.answer in qa.options and qa.answer not in qa.wrong_answers()
            # The long answer states the same fact and a wrong value gives a different sentence.
            assert qa.long != qa.long_for(qa.wrong_answers()[0])
            if cat in ("color", "shape", "count", "position"):
                options, letter = mcq(qa, rng)
                assert options[letter] == qa.answer and len(set(options.values())) == 4
                refs = vqa_answers(qa, rng)
                assert len(refs) == 10 and refs.count(qa.answer) >= 4
    assert all(v > 50 for v in checked.values()), checked


def test_captions_mention_only_what_is_there(scenes):
    rng = np.random.default_rng(3)
    for scene in scenes:
        for text in (caption(scene, rng), detailed_caption(scene, rng)):
            words = re.findall(r"[a-z]+", text.lower())
            colors = {w for w in words if w in COLORS}
            shapes = {PLURAL_TO_SHAPE.get(w, w) for w in words if w in SHAPE_PLURALS or w in PLURAL_TO_SHAPE}
            assert colors == {o.color for o in scene.objects}, text
            assert shapes == {o.shape for o in scene.objects}, text
            assert text[0].isupper() and text.endswith(".")
            assert " a a" not in text and " an " not in text.replace(" an orange", "")


def test_detailed_caption_counts_and_positions(scenes):
    for scene in scenes[:50]:
        text = detailed_caption(scene)
        n = len(scene.objects)
        assert f"shows {NUMBER_WORDS[n]} shape" in text
        for o in scene.objects:
            assert o.phrase in text


def _fact_is_true(fact: str, scene) -> bool:
    """Check one sentence of a dense caption against the scene, parsing it independently."""
    f, objs = fact.lower().rstrip("."), scene.objects
    words = {w: i for i, w in enumerate(NUMBER_WORDS)}
    if m := re.fullmatch(r"there (?:is|are) (\w+) shapes? in the image", f):
        return words[m.group(1)] == len(objs)
    if m := re.fullmatch(r"there (?:is|are) (\w+) (?:(\w+) shapes?|(\w+))", f):
        color, noun = m.group(2), m.group(3)
        shape = PLURAL_TO_SHAPE.get(noun, noun) if noun else None
        return words[m.group(1)] == sum((color is None or o.color == color) and (shape is None or o.shape == shape)
                                        for o in objs)
    if m := re.fullmatch(r"(.+) there is an? (small|large) (\w+) (\w+)", f):
        o = _resolve(m.group(1), objs)
        return (o.size, o.color, o.shape) == m.groups()[1:]
    m = re.fullmatch(r"(the .+?) is (?:an? )?(.+)", f)
    assert m, fact
    o, value = _resolve(m.group(1), objs), m.group(2)
    return value in (o.color, o.shape, o.size, CELL_PHRASES[o.cell])


def test_dense_captions_state_only_true_facts_about_unambiguous_subjects(scenes):
    """Every fact names exactly one object (_resolve asserts it) and states a true attribute;
    the facts look objects up in every direction (by shape, colour and place)."""
    rng = np.random.default_rng(11)
    subjects = set()
    for scene in scenes:
        text = dense_caption(scene, rng)
        facts = text.split(". ")
        assert facts[0].startswith("There") and text.endswith(".") and len(facts) >= 1 + 2 * len(scene.objects)
        for fact in facts:
            assert _fact_is_true(fact, scene), (fact, scene.to_dict())
            if m := re.fullmatch(r"The (.+?) is .+", fact.rstrip(".")):
                subjects.add(_subject_kind(m.group(1)))
    assert subjects == {"place", "colour", "name", "shape"}
    obj = scenes[0].objects[0]
    two_red_circles = replace(scenes[0], objects=(replace(obj, shape="circle", color="red", cell=(0, 0)),
                                                  replace(obj, shape="circle", color="red", cell=(2, 2))))
    for _ in range(20):  # "the circle", "the red shape" and "the red circle" are ambiguous here
        text = dense_caption(two_red_circles, rng)
        assert "The circle" not in text and "The red" not in text, text
        assert all(_fact_is_true(fact, two_red_circles) for fact in text.split(". ")), text


def _subject_kind(subject: str) -> str:
    """What a fact looks its object up by: 'shape in the top left corner' -> place,
    'red shape' / 'red object' -> colour, 'red circle' -> name, 'circle' -> shape."""
    words = subject.split()
    if words[0] == "shape":
        return "place"
    if len(words) == 2:
        return "colour" if words[1] in ("shape", "object") else "name"
    return "shape"


def test_perturbed_scene_differs_visibly(scenes):
    rng = np.random.default_rng(5)
    kinds = set()
    for scene in scenes[:100]:
        wrong, kind = perturb_scene(scene, rng, WORLD)
        kinds.add(kind)
        assert wrong.signature() != scene.signature()
        assert detailed_caption(wrong) != detailed_caption(scene)
    assert kinds == {"color", "shape", "position", "added_object", "removed_object"}
