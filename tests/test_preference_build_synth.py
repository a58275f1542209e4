"""The synthetic world's training-split questions (WORLD/questions/): what `preference build` asks,
on training images only, without changing any other output of the world."""

from __future__ import annotations

import hashlib
import json

import pytest
from test_preference_build import StubSampler

from vlmforge.config import load_recipe
from vlmforge.eval.asking import read_questions
from vlmforge.eval.kinds import get_kind
from vlmforge.eval.prompts import user_turn
from vlmforge.eval.specs import parse_task_specs
from vlmforge.preference.build import BuildSettings, build_preferences, load_plan, read_pairs
from vlmforge.synth import writer

SMALL = ["synth.num_captions=40", "synth.samples_per_shard=20", "synth.num_sft=10", "synth.num_mcq=12",
         "synth.num_vqa=10", "synth.num_pope_images=6", "synth.num_preference=4", "synth.num_text=20",
         "synth.num_vision=10"]
COUNTS = {"mcq": 24, "vqa": 12, "pope_images": 6, "long_answers": 8}


def _files(d) -> dict[str, bytes]:
    # manifest.json and config.yaml record the question counts themselves
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.relative_to(d).as_posix() not in ("manifest.json", "config.yaml")}


def _count_sets(counts: dict) -> list[str]:
    keys = {"mcq": "num_train_mcq", "vqa": "num_train_vqa", "pope_images": "num_train_pope_images",
            "long_answers": "num_long_answers"}
    return [f"synth.{keys[k]}={v}" for k, v in counts.items()]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _signature(scene: dict) -> tuple:
    return tuple(sorted((o["shape"], o["color"], o["size"], o["position"]) for o in scene["objects"]))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("qworlds")
    for name, counts in {"with": COUNTS, "without": dict.fromkeys(COUNTS, 0)}.items():
        writer.generate_world(load_recipe(None, SMALL + _count_sets(counts)), root / name)
    return root


def test_questions_in_the_eval_formats_on_training_images(worlds):
    w = worlds / "with"
    q = w / "questions"
    m = json.loads((w / "manifest.json").read_text())
    assert m["counts"]["questions"] == {"images": 24, "eval_lookalikes_redrawn": m["counts"]["questions"]["eval_lookalikes_redrawn"],
                                        "mcq": 24, "vqa": 12, "pope": 24, "pope_images": 6, "long_answers": 8, "math": 0}
    assert {m["outputs"][k] for k in ("train_mcq", "train_vqa", "train_pope", "long_answers", "train_scenes")} == {
        "questions/mcq.jsonl", "questions/vqa.jsonl", "questions/pope.jsonl", "questions/long_answers.jsonl",
        "questions/scenes.jsonl"}
    for kind, name in (("mcq", "mcq"), ("mmbench", "mcq"), ("vqa", "vqa"), ("pope", "pope")):
        read = read_questions(q / f"{name}.jsonl", kind, strict=True)
        assert read.items and not read.skipped
    # asked exactly as the eval's letter protocol asks its own multiple choice
    train = read_questions(q / "mcq.jsonl", "mcq").items[0]
    bench = read_questions(w / "eval" / "mcq.jsonl", "mmbench").items[0]
    rules = get_kind("mcq")
    assert user_turn("mcq", train)["content"].endswith(rules.build_prompt(train))
    assert rules.build_prompt(train).splitlines()[-1] == get_kind("mmbench").build_prompt(bench).splitlines()[-1]
    assert all(r["prompt"] == rules.build_prompt(it) for r, it in zip(_jsonl(q / "mcq.jsonl"), read_questions(q / "mcq.jsonl", "mcq").items))
    pope = _jsonl(q / "pope.jsonl")
    assert sum(r["answer"] == "yes" for r in pope) == len(pope) // 2
    long = _jsonl(q / "long_answers.jsonl")
    assert len(long) == 8 and all(len(r["answer"].split()) >= 10 and r["question"] for r in long)
    scenes = {r["image"]: r["scene"] for r in _jsonl(q / "scenes.jsonl")}
    assert {r["image"] for r in _jsonl(q / "mcq.jsonl") + _jsonl(q / "vqa.jsonl") + pope + long} <= set(scenes)


def test_no_question_image_or_scene_is_an_eval_one(worlds):
    w = worlds / "with"

    def hashes(folder):
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    assert not hashes(w / "questions" / "images") & hashes(w / "eval" / "images")
    held_out = {_signature(r["scene"]) for r in _jsonl(w / "eval" / "scenes.jsonl")}
    assert not {_signature(r["scene"]) for r in _jsonl(w / "questions" / "scenes.jsonl")} & held_out


def test_the_other_outputs_do_not_change(worlds):
    a, b = _files(worlds / "with"), _files(worlds / "without")
    assert {k for k in a if not k.startswith("questions/")} == set(b) - {k for k in b if k.startswith("questions/")}
    assert all(a[k] == b[k] for k in b if not k.startswith("questions/"))
    assert (worlds / "without" / "questions" / "mcq.jsonl").read_text() == ""


@pytest.mark.parametrize("benchmark_images", [250, 600])
def test_a_world_the_benchmarks_nearly_exhaust_gives_fewer_questions(tmp_path, monkeypatch, benchmark_images):
    # 2 shapes x 2 colours x 2 sizes x 9 cells: 72 possible scenes; 250 benchmark images show
    # nearly all of them, 600 every one (then no training question at all)
    monkeypatch.setattr(writer, "FRESH_SCENE_TRIES", 200)
    small = SMALL + ["synth.shapes=[circle,square]", "synth.colors=[red,green]", "synth.max_objects=1",
                     f"synth.num_mcq={benchmark_images - 100}", "synth.num_vqa=100", "synth.num_pope_images=0",
                     *_count_sets({"mcq": 40, "vqa": 0, "pope_images": 0, "long_answers": 0})]
    writer.generate_world(load_recipe(None, small), tmp_path / "w")
    held_out = {_signature(r["scene"]) for r in _jsonl(tmp_path / "w" / "eval" / "scenes.jsonl")}
    train = [_signature(r["scene"]) for r in _jsonl(tmp_path / "w" / "questions" / "scenes.jsonl")]
    assert not set(train) & held_out
    counts = json.loads((tmp_path / "w" / "manifest.json").read_text())["counts"]["questions"]
    assert counts["mcq"] == len(train) == (40 if len(held_out) < 72 else 0)


def test_preference_build_reads_the_world_questions(worlds, tmp_path):
    q = worlds / "with" / "questions"
    specs = parse_task_specs([f"mcq:{q / 'mcq.jsonl'}", f"vqa:{q / 'vqa.jsonl'}", f"pope:{q / 'pope.jsonl'}"])
    plan = load_plan(specs, q / "long_answers.jsonl")
    assert not plan.skipped and len(plan.questions) == 24 + 12 + 24 and len(plan.long_answers) == 8
    m = build_preferences(plan, tmp_path / "pairs", BuildSettings(samples=4), StubSampler, identity={}, progress=False)
    assert m["image_root"] == str(q.resolve())  # the question files' folder: paths as the rows write them
    assert all((q / r["image"]).is_file() and r["image"].startswith("images/") for r in read_pairs(tmp_path / "pairs" / "pairs.jsonl"))
