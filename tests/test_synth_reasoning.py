"""The world's reasoning task: every worked solution agrees with the scene it is about (an oracle
reads the question and the scene's ground truth on its own), wrong solutions go wrong exactly at
the step they declare, the files are held out and seeded, and the math kind asks and scores them."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from vlmforge.config import load_recipe
from vlmforge.critic.steps import split_steps
from vlmforge.eval import evaluate
from vlmforge.eval.items import TaskError
from vlmforge.eval.kinds.math import MathKind
from vlmforge.eval.prompt_parts import REASONING_SUFFIX as EVAL_SUFFIX
from vlmforge.eval.specs import parse_task_specs
from vlmforge.imagedecode import decode_image
from vlmforge.synth import instructions, reasoning
from vlmforge.synth.language import REASONING_SUFFIX
from vlmforge.synth.world import SHAPE_PLURALS, SceneSampler
from vlmforge.synth.writer import generate_world

BASE = ["synth.num_captions=20", "synth.samples_per_shard=20", "synth.num_sft=40", "synth.num_mcq=6",
        "synth.num_vqa=6", "synth.num_pope_images=3", "synth.num_preference=2", "synth.num_text=10",
        "synth.num_vision=4", "synth.num_train_mcq=10", "synth.num_train_vqa=4", "synth.num_train_pope_images=2",
        "synth.num_long_answers=2", "synth.sft_multi_turn_frac=1.0", "synth.sft_max_turns=4",
        "synth.sft_text_only_frac=0.2"]
MATH = ["synth.num_math=40", "synth.num_math_steps=48", "synth.num_train_math=30"]
SIDES = {"triangle": 3, "square": 4}
SINGULAR = {p: s for s, p in SHAPE_PLURALS.items()}


def _recipe(*extra):
    return load_recipe(None, BASE + list(extra))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("math_worlds")
    made = {"a": MATH, "b": MATH, "seed1": [*MATH, "synth.seed=1"], "none": [],
            "sft": [*MATH, "synth.sft_turn_weights.math=0.5", "synth.sft_turn_weights.count=0.5"]}
    for name, extra in made.items():
        generate_world(_recipe(*extra), root / name)
    return {name: root / name for name in made}


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


def _scenes(folder: Path) -> dict[str, dict]:
    return {r["image"]: r["scene"] for r in _jsonl(folder / "scenes.jsonl")}


# ------------------------------------------------------------------ an oracle of its own

def _matches(obj: dict, noun: str) -> bool:
    """Does the object fit 'circle(s)' / 'red shape(s)' / 'shape(s)'?"""
    words = noun.split()
    if words[-1] in ("shape", "shapes"):
        return len(words) == 1 or obj["color"] == words[0]
    return obj["shape"] == SINGULAR.get(words[-1], words[-1])


def _count(objects: list[dict], noun: str) -> int:
    return sum(_matches(o, noun) for o in objects)


def oracle_answer(question: str, objects: list[dict]) -> int:
    """The answer, read from the question and the objects, by another route than the steps take."""
    if m := re.fullmatch(r"How many more (.+) than (.+) are there\?", question):
        return _count(objects, m[1]) - _count(objects, m[2])
    if m := re.fullmatch(r"How many (.+) and (.+) are there together\?", question):
        return sum(_matches(o, m[1]) or _matches(o, m[2]) for o in objects)
    if re.fullmatch(r"How many sides do the (triangles and squares|triangles|squares) have in total\?", question):
        return sum(SIDES.get(o["shape"], 0) for o in objects)
    if m := re.fullmatch(r"How many shapes are not (\w+)\?", question):
        word = m[1]
        return sum(not (o["shape"] == SINGULAR.get(word) or o["color"] == word) for o in objects)
    raise AssertionError(f"no family reads {question!r}")


_SEEN = re.compile(r"There (is|are) (\d+) (.+)\.")
_OP = re.compile(r"(\d+) ([-+x]) (\d+) = (-?\d+)\.")
_FINAL = re.compile(r"The answer is (-?\d+)\.")


def check_step(step: str, objects: list[dict], values: list[int]) -> bool:
    """Is the step true of the scene (a count) or of the numbers before it (an operation)? Appends
    the number it states to ``values``."""
    if m := _SEEN.fullmatch(step):
        n = int(m[2])
        values.append(n)
        return (m[1] == "is") == (n == 1) and n == _count(objects, m[3])
    if m := _OP.fullmatch(step):
        a, sym, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
        values.append(r)
        return r == {"+": a + b, "-": a - b, "x": a * b}[sym]
    m = _FINAL.fullmatch(step)
    assert m, step
    return int(m[1]) == values[-1]


def _gold_ok(row: dict, objects: list[dict]) -> None:
    steps = row["steps"]
    values: list[int] = []
    assert all(check_step(s, objects, values) for s in steps), steps
    assert int(row["answer"]) == oracle_answer(row["question"], objects) == int(_FINAL.fullmatch(steps[-1])[1])
    kinds = ["seen" if _SEEN.fullmatch(s) else "op" if _OP.fullmatch(s) else "final" for s in steps]
    assert kinds == sorted(kinds, key=["seen", "op", "final"].index) and kinds.count("final") == 1
    assert kinds.count("seen") >= 1 and kinds.count("op") >= 1


# ------------------------------------------------------------------ gold solutions

def test_every_gold_solution_agrees_with_the_scene(worlds):
    w = worlds["a"]
    for folder in (w / "eval", w / "questions"):
        scenes = _scenes(folder)
        rows = _jsonl(folder / "math.jsonl")
        assert len(rows) == (40 if folder.name == "eval" else 30)
        for r in rows:
            assert {"id", "image", "question", "answer", "answer_type", "question_type", "solve", "category", "steps",
                    "prompt"} == set(r)
            assert (r["answer_type"], r["question_type"], r["solve"]) == ("integer", "free_form", "steps")
            assert r["answer"] == str(int(r["answer"])) and int(r["answer"]) >= 0
            assert r["prompt"] == f"{r['question']}\n{REASONING_SUFFIX}" and (folder / r["image"]).is_file()
            _gold_ok(r, scenes[r["image"]]["objects"])
        assert [r["category"] for r in rows[:8]] == list(reasoning.CATEGORIES) * 2  # every family, in turn


def test_gold_solutions_on_many_scenes_and_worlds():
    """Straight from the sampler, in worlds with and without the shapes that have sides."""
    for shapes in (["circle", "square", "triangle", "star"], ["square", "cross"], ["circle", "star", "cross"]):
        world = SceneSampler(shapes, ["red", "green", "blue"], 1, 6, repeat_prob=0.5)
        rng = np.random.default_rng(3)
        cats = reasoning.categories(world)
        assert ("sides" in cats) == any(s in shapes for s in SIDES)
        for i in range(300):
            scene = world.sample(rng)
            p = reasoning.ask(cats[i % len(cats)], scene, rng, world)
            row = {"question": p.question, "answer": str(p.answer), "steps": p.steps}
            _gold_ok(row, scene.to_dict()["objects"])
            if p.category == "more":
                assert p.seen[0].n >= max(1, p.seen[1].n)  # never a negative answer; 0 when the counts tie
    with pytest.raises(ValueError, match="triangle or a square"):
        reasoning.ask_sides(scene, rng, world)


def test_steps_are_the_blank_line_steps_the_critic_reads(worlds):
    for r in _jsonl(worlds["a"] / "eval" / "math.jsonl"):
        assert split_steps(reasoning.join(r["steps"])) == r["steps"]
    # SFT: a math turn's reply is the gold steps joined by blank lines, asked with the eval prompt
    recs = json.loads((worlds["sft"] / "sft" / "llava.json").read_text())
    seen = 0
    for rec in recs:
        for j, cat in enumerate(rec["categories"]):
            if cat != "math":
                continue
            human, gpt = (c["value"] for c in rec["conversations"][2 * j: 2 * j + 2])
            question = human.splitlines()[-2]
            assert human.endswith(f"{question}\n{REASONING_SUFFIX}")
            steps = split_steps(gpt)
            assert reasoning.join(steps) == gpt and _FINAL.fullmatch(steps[-1])
            values: list[int] = []
            assert all(check_step(s, [], values) for s in steps if not _SEEN.fullmatch(s))  # arithmetic holds
            seen += 1
    assert seen > 10


def test_the_sft_prompt_is_the_eval_prompt(tmp_path):
    """One string: the SFT turn's human text is what the math kind asks for the same question."""
    assert EVAL_SUFFIX is REASONING_SUFFIX and REASONING_SUFFIX.endswith('"The answer is N." where N is the number.')
    world = SceneSampler(["circle", "square", "triangle", "star"], ["red", "green", "blue", "yellow"])
    rng = np.random.default_rng(0)
    (tmp_path / "i.jpg").write_bytes(b"")
    kind = MathKind()
    for _ in range(20):
        scene = world.sample(rng)
        cat, human, gpt = instructions.turn("math", scene, rng, world)
        question = human.split("\n")[0]
        row = {"id": "q", "image": "i.jpg", "question": question, "answer": "3", "answer_type": "integer",
               "solve": "steps"}
        item = kind.parse_row(row, tmp_path, "t:1")
        assert cat == "math" and human == kind.build_prompt(item) == reasoning.prompt(question)


# ------------------------------------------------------------------ wrong solutions

def test_wrong_solutions_go_wrong_at_the_declared_step(worlds):
    w = worlds["a"]
    scenes = _scenes(w / "eval")
    rows = _jsonl(w / "eval" / "math_steps.jsonl")
    assert len(rows) == 48
    by_error = {e: 0 for e in reasoning.ERRORS}
    pairs = set()
    for r in rows:
        assert {"id", "image", "question", "prompt", "answer", "steps", "labels", "first_wrong", "category",
                "error"} == set(r)
        objects = scenes[r["image"]]["objects"]
        steps, fw = r["steps"], r["first_wrong"]
        assert int(r["answer"]) == oracle_answer(r["question"], objects)
        truth = []
        values: list[int] = []
        for s in steps:
            truth.append(check_step(s, objects, values))
        stated = int(_FINAL.fullmatch(steps[-1])[1])
        by_error[r["error"]] += 1
        pairs.add((r["category"], r["error"]))
        if r["error"] == "none":
            assert fw is None and all(truth) and r["labels"] == ["+"] * len(steps) and stated == int(r["answer"])
            continue
        # right up to the declared step, which is false, and the solution ends wrong
        assert all(truth[:fw]) and not truth[fw] and stated != int(r["answer"])
        assert r["labels"] == ["+"] * fw + ["-"] * (len(steps) - fw)
        kind = "seen" if _SEEN.fullmatch(steps[fw]) else "op" if _OP.fullmatch(steps[fw]) else "final"
        assert kind == {"miscount": "seen", "arithmetic": "op", "answer": "final"}[r["error"]]
        # after a miscount or a slip every later step follows from the steps before it
        later: list[int] = []
        for i, s in enumerate(steps):
            ok = check_step(s, objects, later)
            if i > fw and not _SEEN.fullmatch(s):
                assert ok, (s, steps)
        assert min(later) >= 0  # no negative number anywhere
    assert by_error == {e: 12 for e in reasoning.ERRORS}
    assert len(pairs) == 16  # every error kind in every family


def test_wrong_solution_by_hand():
    seen = (reasoning.Seen("circle", "circles", 2), reasoning.Seen("square", "squares", 1))
    p = reasoning.Problem("together", "How many circles and squares are there together?", seen,
                          (reasoning.Op(("seen", 0), "+", ("seen", 1)),))
    assert p.steps == ["There are 2 circles.", "There is 1 square.", "2 + 1 = 3.", "The answer is 3."]
    rng = np.random.default_rng(0)
    s = reasoning.wrong_solution(p, "miscount", rng)
    assert s.first_wrong in (0, 1) and s.labels[: s.first_wrong] == ["+"] * s.first_wrong
    assert s.steps[-1] != "The answer is 3." and s.labels[s.first_wrong:] == ["-"] * (4 - s.first_wrong)
    s = reasoning.wrong_solution(p, "arithmetic", rng)
    assert s.first_wrong == 2 and s.steps[2] in ("2 + 1 = 2.", "2 + 1 = 4.") and s.labels == ["+", "+", "-", "-"]
    assert s.steps[3] == f"The answer is {s.steps[2][-2]}."
    s = reasoning.wrong_solution(p, "answer", rng)
    assert s.steps[:3] == p.steps[:3] and s.steps[3] in ("The answer is 2.", "The answer is 4.")
    assert s.labels == ["+", "+", "+", "-"]
    assert reasoning.wrong_solution(p, "none", rng).labels == ["+"] * 4
    with pytest.raises(ValueError, match="unknown error"):
        reasoning.wrong_solution(p, "typo", rng)


# ------------------------------------------------------------------ files: held out, seeded, independent

def _hashes(folder: Path, prefix: str = "") -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "images").glob(f"{prefix}*")}


def _signature(scene: dict) -> tuple:
    return tuple(sorted((o["shape"], o["color"], o["size"], o["position"]) for o in scene["objects"]))


def test_eval_and_training_scenes_do_not_overlap(worlds):
    w = worlds["a"]
    eval_scenes = _jsonl(w / "eval" / "scenes.jsonl")
    math_images = {r["image"] for r in _jsonl(w / "eval" / "math.jsonl") + _jsonl(w / "eval" / "math_steps.jsonl")}
    assert math_images <= {r["image"] for r in eval_scenes}
    held_out = {_signature(r["scene"]) for r in eval_scenes}
    train = {_signature(r["scene"]) for r in _jsonl(w / "questions" / "scenes.jsonl")}
    assert not held_out & train
    math_h = _hashes(w / "eval", "math-")
    assert len(math_h) == 40 + 48
    assert not math_h & (_hashes(w / "questions") | _hashes(w / "sft"))
    m = json.loads((w / "manifest.json").read_text())
    assert m["counts"]["eval"]["math"] == 40 and m["counts"]["eval"]["math_steps"] == 48
    assert m["counts"]["eval"]["math_steps_errors"] == {e: 12 for e in sorted(reasoning.ERRORS)}
    assert m["counts"]["questions"]["math"] == 30 and m["outputs"]["train_math"] == "questions/math.jsonl"
    assert (m["outputs"]["math"], m["outputs"]["math_steps"]) == ("eval/math.jsonl", "eval/math_steps.jsonl")


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "config.yaml")}


def test_determinism_per_seed_and_independent_streams(worlds):
    a, b, c, none = (_files(worlds[k]) for k in ("a", "b", "seed1", "none"))
    assert a == b
    for k in ("eval/math.jsonl", "eval/math_steps.jsonl", "questions/math.jsonl"):
        assert a[k] != c[k], k
    # the reasoning task adds files and appends its scenes; everything else is as without it
    assert none["eval/math.jsonl"] == none["eval/math_steps.jsonl"] == none["questions/math.jsonl"] == b""
    same = [k for k in none if not k.startswith("questions/") and k not in ("eval/scenes.jsonl", "eval/math.jsonl",
                                                                            "eval/math_steps.jsonl")]
    assert same and all(a[k] == none[k] for k in same)
    assert a["eval/scenes.jsonl"].startswith(none["eval/scenes.jsonl"])


def test_a_zero_math_weight_keeps_the_sft_data(tmp_path):
    """The built-in mix holds math at 0: its SFT data is what the mix without the key gives."""
    old = {k: v for k, v in instructions.TURN_WEIGHTS.items() if k != "math"}
    assert instructions.TURN_WEIGHTS["math"] == 0 and list(instructions.TURN_WEIGHTS)[-1] == "math"
    generate_world(_recipe(), tmp_path / "builtin")
    generate_world(_recipe(*[f"synth.sft_turn_weights.{k}={v}" for k, v in old.items()]), tmp_path / "old")
    assert (tmp_path / "builtin/sft/llava.json").read_bytes() == (tmp_path / "old/sft/llava.json").read_bytes()


@pytest.mark.parametrize("name", ["num_math", "num_math_steps", "num_train_math"])
def test_negative_counts_are_refused(tmp_path, name):
    from vlmforge.cli import main

    assert main(["synth", "--out", str(tmp_path / "w"), "--quiet", "--set", f"synth.{name}=-1"]) == 2


# ------------------------------------------------------------------ the math kind end to end

def test_synth_math_is_asked_step_by_step_and_scored(worlds):
    w = worlds["a"]
    # `synth` stays the short-answer benchmarks; synth-math is named on its own
    assert [s.name for s in parse_task_specs("synth", w)] == ["synth-mcq", "synth-vqa", "synth-pope"]
    assert [(s.name, s.kind) for s in parse_task_specs("synth-math", w)] == [("synth-math", "math")]
    with pytest.raises(TaskError, match="synth.num_math=0"):
        parse_task_specs("synth-math", worlds["none"])
    rows = _jsonl(w / "eval" / "math.jsonl")
    gold = {decode_image((w / "eval" / r["image"]).read_bytes()).tobytes(): r for r in rows}
    prompts = []

    def solver(wrong: bool):
        def answer(batch, images):
            out = []
            for messages, imgs in zip(batch, images):
                r = gold[imgs[-1].tobytes()]
                prompts.append((messages[-1]["content"], r["prompt"]))
                stated = int(r["answer"]) + 1 if wrong else int(r["answer"])
                out.append(reasoning.join(r["steps"][:-1] + [f"The answer is {stated}."]))
            return out
        return answer

    res = evaluate(tasks="synth-math", synth_dir=w, generate_fn=solver(False), progress=False)
    metrics = res["synth-math"]["metrics"]
    assert metrics["accuracy"] == 1.0 and {f"accuracy/{c}" for c in reasoning.CATEGORIES} <= set(metrics)
    assert all(asked == f"<image>\n{prompt}" for asked, prompt in prompts) and len(prompts) == 40
    res = evaluate(tasks="synth-math", synth_dir=w, generate_fn=solver(True), progress=False)
    assert res["synth-math"]["metrics"]["accuracy"] == 0.0
