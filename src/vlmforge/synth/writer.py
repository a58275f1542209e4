"""Build the whole synthetic world into one folder (see ``vlmforge synth --help`` for the layout).

Every output draws from its own random stream ``default_rng([seed, stream])``, so outputs are
independent of each other's sizes and the folder is byte-identical for a seed (except the
timestamp in manifest.json). Everything is written into a hidden temp folder first and moved into
place at the end, so an interrupted run leaves no half world behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from vlmforge.config import load_recipe, save_resolved
from vlmforge.config.recipe import Recipe
from vlmforge.config.synth import SynthConfig
from vlmforge.errors import ConfigError, UserError
from vlmforge.files import prepare_out_dir, write_manifest
from vlmforge.shards import ShardWriter, sequential_key, shard_name
from vlmforge.synth import benchmarks, corpus, faults, instructions, multi_image, preference, reasoning
from vlmforge.synth.language import CAPTION_STYLES, detailed_caption, pick
from vlmforge.synth.language import caption as make_caption
from vlmforge.synth.questions import MCQ_CATEGORIES
from vlmforge.synth.render import encode_jpeg, render_scene
from vlmforge.synth.world import SceneSampler

OUTPUT_DIRS = ("captions", "sft", "eval", "preference", "text", "vision", "questions")
STREAMS = {"captions": 1, "faults": 2, "sft": 3, "mcq": 4, "vqa": 5, "pope": 6, "preference": 7, "text": 8, "vision": 9,
           "train_scenes": 10, "train_mcq": 11, "train_vqa": 12, "train_pope": 13, "long_answers": 14,
           "math": 15, "math_steps": 16, "train_math": 17, "multi": 18, "sft_multi": 19}
# Training-split questions (questions/): MCQ, VQA, POPE and math rows as eval/ writes them but on
# training images, and long answers for dropout next-token prediction; what `vlmforge preference
# build` (and `vlmforge prm-data`, the math rows) asks.
# Sized for the default demo until the synth section has a knob for them.
# Give up looking for a training scene unlike every eval scene after this many draws in a row
# (a world so small that the benchmarks show every scene it has); fewer questions then.
FRESH_SCENE_TRIES = 1000
URL_BASE = "https://synth.vlmforge.invalid/img"


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), STREAMS[stream]])


def _uid(seed: int, index: int) -> str:
    """32 lowercase hex chars, stable per (seed, slot), like DataComp's uids."""
    return hashlib.md5(f"vlmforge-synth:{seed}:{index}".encode()).hexdigest()


def _write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


class _Images:
    """Renders scenes into ``folder/images/NAME.jpg``; returns the path relative to ``folder``."""

    def __init__(self, folder: Path, cfg: SynthConfig) -> None:
        self.folder = folder
        (folder / "images").mkdir(parents=True, exist_ok=True)
        self.size, self.ss, self.q = cfg.image_size, cfg.supersample, cfg.jpeg_quality

    def save(self, name: str, scene) -> str:
        rel = f"images/{name}.jpg"
        (self.folder / rel).write_bytes(encode_jpeg(render_scene(scene, self.size, self.ss), self.q))
        return rel


def _scene_rows(seed: int, stream: str, n: int, id_format: str, world: SceneSampler, images: _Images,
                progress: bool, make_row) -> list:
    """``make_row(i, row_id, image, scene, rng)`` for ``n`` fresh scenes drawn from ``stream``, each
    saved as ``images/{row_id}.jpg`` first (``row_id = id_format.format(i)``)."""
    rng = _rng(seed, stream)
    rows = []
    for i in tqdm(range(n), desc=f"synth {stream}", disable=not progress, leave=False):
        scene = world.sample(rng)
        rid = id_format.format(i)
        rows.append(make_row(i, rid, images.save(rid, scene), scene, rng))
    return rows


def _checked_mix(setting: str, weights, choices) -> dict[str, float]:
    """Relative weights by name (empty = the built-in mix): known names, >= 0, positive sum."""
    mix = {k: float(v) for k, v in dict(weights or {}).items()}
    bad = [k for k in mix if k not in choices]
    if bad:
        raise ConfigError(f"{setting}: unknown names {bad}; choose from {list(choices)}")
    if mix and (min(mix.values()) < 0 or sum(mix.values()) <= 0):
        raise ConfigError(f"{setting}: weights must be >= 0 with a positive sum")
    return mix


def _captions(cfg: SynthConfig, world: SceneSampler, out: Path, progress: bool) -> tuple[dict, Counter]:
    rng = _rng(cfg.seed, "captions")
    n, spp = cfg.num_captions, cfg.samples_per_shard
    clean = []
    popularity: Counter = Counter()
    for _ in tqdm(range(n), desc="synth captions", disable=not progress, leave=False):
        scene = world.sample(rng)
        im = render_scene(scene, cfg.image_size, cfg.supersample)
        text = make_caption(scene, rng, cfg.caption_mix)
        clean.append(faults.CleanSample(scene, im, encode_jpeg(im, cfg.jpeg_quality), text))
        popularity.update(o.name for o in scene.objects)
    frng = _rng(cfg.seed, "faults")
    plan = faults.plan_faults(n, cfg.faults, frng)
    samples = faults.apply_faults(clean, plan, frng, cfg.jpeg_quality, cfg.supersample, cfg.caption_mix)

    keys = [sequential_key(i, spp) for i in range(n)]
    folder = out / "captions"
    fault_rows, scene_rows = [], []
    with ShardWriter(folder, samples_per_shard=spp, timestamps=False) as writer:
        for i, s in enumerate(samples):
            key = writer.next_key()
            assert key == keys[i]
            uid = _uid(cfg.seed, i)
            meta = {"uid": uid, "url": f"{URL_BASE}/{uid}.jpg"}
            if s.scene is not None:  # every image here is image_size square (saves a header probe)
                meta.update(width=cfg.image_size, height=cfg.image_size)
            writer.write(key, s.image_bytes, s.caption, meta)
            shard = f"{shard_name(i // spp)}.tar"
            if s.fault is not None:
                row = {"key": key, "shard": shard}
                for k, v in s.fault.items():
                    # slot indices -> keys, now that keys are known
                    row[k.replace("_index", "_key") if k.endswith("_index") else k] = (
                        keys[v] if k.endswith("_index") else v
                    )
                fault_rows.append(row)
            scene_rows.append({"key": key, "scene": s.scene.to_dict() if s.scene is not None else None})
    _write_jsonl(folder / "faults.jsonl", fault_rows)
    _write_jsonl(folder / "scenes.jsonl", scene_rows)
    counts = Counter(r["fault"] for r in fault_rows)
    return {
        "captions": n,
        "shards": len(writer.written),
        "faults": {t: counts.get(t, 0) for t in faults.FAULT_TYPES},
        "clean": n - len(fault_rows),
    }, popularity


def _sft(cfg: SynthConfig, world: SceneSampler, out: Path, progress: bool) -> dict:
    rng = _rng(cfg.seed, "sft")
    images = _Images(out / "sft", cfg)
    records, cats, text_only_n = [], Counter(), 0
    two_image = int(cfg.sft_multi_image_frac * cfg.num_sft + 0.5)
    for i in tqdm(range(cfg.num_sft - two_image), desc="synth sft", disable=not progress, leave=False):
        scene = world.sample(rng)
        rid = f"sft-{i:06d}"
        multi = rng.random() < cfg.sft_multi_turn_frac
        turns = int(rng.integers(2, max(2, cfg.sft_max_turns) + 1)) if multi else 1
        # drawn only when asked for, so that worlds without text-only conversations stay as they were
        text_only = cfg.sft_text_only_frac > 0 and rng.random() < cfg.sft_text_only_frac
        rec = instructions.conversation(rid, None if text_only else images.save(rid, scene), scene, rng, world,
                                        turns, cfg.sft_turn_weights, cfg.sft_short_answer_frac)
        text_only_n += text_only
        cats.update(rec["categories"])
        records.append(rec)
    # Two-image conversations: their own stream, after the others (the one-image ones stay as they were).
    rng = _rng(cfg.seed, "sft_multi")
    kinds = multi_image.CATEGORIES
    for i in tqdm(range(two_image), desc="synth sft two-image", disable=not progress, leave=False):
        first, second, qa = multi_image.draw(kinds[i % len(kinds)], rng, world)
        rid = f"sft-multi-{i:06d}"
        pair = [images.save(f"{rid}-1", first), images.save(f"{rid}-2", second)]
        multi = rng.random() < cfg.sft_multi_turn_frac
        turns = int(rng.integers(2, max(2, cfg.sft_max_turns) + 1)) if multi else 1
        rec = multi_image.conversation(rid, pair, first, second, qa, rng, world, turns, cfg.sft_short_answer_frac)
        cats.update(rec["categories"])
        records.append(rec)
    path = out / "sft" / "llava.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return {"conversations": len(records), "text_only": text_only_n, "two_image": two_image, "turns": sum(cats.values()),
            "turn_categories": dict(sorted(cats.items()))}


def _mcq_categories(world: SceneSampler) -> list[str]:
    """Multiple choice: only categories with >= 4 possible values can have 4 options."""
    cats = [c for c in MCQ_CATEGORIES if c not in ("shape",) or len(world.shapes) >= 4]
    return [c for c in cats if c != "color" or len(world.colors) >= 4]


def _eval(cfg: SynthConfig, world: SceneSampler, out: Path, popularity: Counter, progress: bool) -> dict:
    folder = out / "eval"
    images = _Images(folder, cfg)
    counts = {}
    scenes = []  # ground truth per eval image, for analysis and tests
    cats = _mcq_categories(world)

    def mcq_row(i, rid, rel, scene, rng):
        scenes.append({"image": rel, "scene": scene.to_dict()})
        return benchmarks.mcq_row(rid, rel, scene, cats[i % len(cats)], rng, world)

    def vqa_row(i, rid, rel, scene, rng):
        scenes.append({"image": rel, "scene": scene.to_dict()})
        cat = benchmarks.VQA_CATEGORIES[i % len(benchmarks.VQA_CATEGORIES)]
        return benchmarks.vqa_row(rid, rel, scene, cat, rng, world)

    rows = _scene_rows(cfg.seed, "mcq", cfg.num_mcq, "mcq-{:05d}", world, images, progress, mcq_row)
    counts["mcq"] = _write_jsonl(folder / "mcq.jsonl", rows)
    rows = _scene_rows(cfg.seed, "vqa", cfg.num_vqa, "vqa-{:05d}", world, images, progress, vqa_row)
    counts["vqa"] = _write_jsonl(folder / "vqa.jsonl", rows)

    rng = _rng(cfg.seed, "pope")
    rows = []
    k = cfg.pope_per_image
    for i in tqdm(range(cfg.num_pope_images), desc="synth pope", disable=not progress, leave=False):
        scene = world.sample(rng)
        for _ in range(1000):  # need k distinct objects present for k "yes" questions
            if len({o.name for o in scene.objects}) >= k:
                break
            scene = world.sample(rng)
        else:
            raise ConfigError(f"synth.pope_per_image={k} needs scenes with >= {k} objects (max_objects)")
        rid = f"pope-{i:05d}"
        sampling = benchmarks.POPE_SAMPLINGS[i % len(benchmarks.POPE_SAMPLINGS)]
        rel = images.save(rid, scene)
        scenes.append({"image": rel, "scene": scene.to_dict()})
        rows += benchmarks.pope_rows(rid, rel, scene, sampling, k, rng, world, popularity)
    counts["pope"] = _write_jsonl(folder / "pope.jsonl", rows)
    counts["pope_yes"] = sum(r["answer"] == "yes" for r in rows)

    # The reasoning task: its own streams and images, its scenes after the others' in scenes.jsonl
    # (a world without it keeps every file as it was).
    math_cats = reasoning.categories(world)

    def math_row(i, rid, rel, scene, rng):
        scenes.append({"image": rel, "scene": scene.to_dict()})
        return benchmarks.math_row(rid, rel, scene, math_cats[i % len(math_cats)], rng, world)

    def math_steps_row(i, rid, rel, scene, rng):
        scenes.append({"image": rel, "scene": scene.to_dict()})
        error = reasoning.ERRORS[i % len(reasoning.ERRORS)]
        # the category turns on by one every len(ERRORS) rows: every error meets every category
        cat = math_cats[(i + i // len(reasoning.ERRORS)) % len(math_cats)]
        return benchmarks.math_steps_row(rid, rel, scene, cat, error, rng, world)

    rows = _scene_rows(cfg.seed, "math", cfg.num_math, "math-{:05d}", world, images, progress, math_row)
    counts["math"] = _write_jsonl(folder / "math.jsonl", rows)
    rows = _scene_rows(cfg.seed, "math_steps", cfg.num_math_steps, "math-steps-{:05d}", world, images, progress,
                       math_steps_row)
    counts["math_steps"] = _write_jsonl(folder / "math_steps.jsonl", rows)
    counts["math_steps_errors"] = dict(sorted(Counter(r["error"] for r in rows).items()))

    # Two-image questions: two held-out images per row, their scenes after the reasoning task's.
    rng = _rng(cfg.seed, "multi")
    kinds = multi_image.CATEGORIES
    rows = []
    for i in tqdm(range(cfg.num_multi), desc="synth multi", disable=not progress, leave=False):
        first, second, qa = multi_image.draw(kinds[i % len(kinds)], rng, world)
        rid = f"multi-{i:05d}"
        pair = [images.save(f"{rid}-1", first), images.save(f"{rid}-2", second)]
        scenes += [{"image": rel, "scene": sc.to_dict()} for rel, sc in zip(pair, (first, second))]
        rows.append(multi_image.eval_row(rid, pair, qa, rng))
    counts["multi"] = _write_jsonl(folder / "multi.jsonl", rows)
    _write_jsonl(folder / "scenes.jsonl", scenes)
    counts["images"] = (cfg.num_mcq + cfg.num_vqa + cfg.num_pope_images + cfg.num_math + cfg.num_math_steps
                        + 2 * cfg.num_multi)
    return counts


def _scene_signature(scene: dict) -> tuple:
    """What a scene shows (``Scene.to_dict``), as a set key."""
    return tuple(sorted((o["shape"], o["color"], o["size"], o["position"]) for o in scene["objects"]))


def _train_questions(cfg: SynthConfig, world: SceneSampler, out: Path, popularity: Counter, progress: bool,
                     counts: dict[str, int] | None = None) -> dict:
    """``questions/{mcq,vqa,pope,math}.jsonl`` in the eval rows' formats and ``questions/long_answers.jsonl``
    ({id, image, question, answer}: detailed descriptions), on fresh training images: no scene of
    them shows what an eval scene shows. Every file has its own random stream and image i is the
    same whatever the counts, so the eval sets and the other outputs do not change."""
    counts = dict(counts or {})
    folder = out / "questions"
    images = _Images(folder, cfg)
    held_out = {_scene_signature(r["scene"]) for r in map(json.loads, (out / "eval" / "scenes.jsonl").read_text().splitlines())}
    rng = _rng(cfg.seed, "train_scenes")
    pool, redrawn = [], 0
    for i in tqdm(range(max(counts.values())), desc="synth questions", disable=not progress, leave=False):
        for _ in range(FRESH_SCENE_TRIES):
            scene = world.sample(rng)
            if _scene_signature(scene.to_dict()) not in held_out:
                break
            redrawn += 1
        else:
            break
        rid = f"train-{i:05d}"
        pool.append((images.save(rid, scene), scene))
    _write_jsonl(folder / "scenes.jsonl", ({"image": rel, "scene": scene.to_dict()} for rel, scene in pool))

    cats = _mcq_categories(world)
    rng = _rng(cfg.seed, "train_mcq")
    done = {"images": len(pool), "eval_lookalikes_redrawn": redrawn}
    done["mcq"] = _write_jsonl(folder / "mcq.jsonl", (
        benchmarks.mcq_row(f"train-mcq-{i:05d}", rel, scene, cats[i % len(cats)], rng, world)
        for i, (rel, scene) in enumerate(pool[: counts["mcq"]])))
    rng = _rng(cfg.seed, "train_vqa")
    cat = benchmarks.VQA_CATEGORIES
    done["vqa"] = _write_jsonl(folder / "vqa.jsonl", (
        benchmarks.vqa_row(f"train-vqa-{i:05d}", rel, scene, cat[i % len(cat)], rng, world)
        for i, (rel, scene) in enumerate(pool[: counts["vqa"]])))
    rng = _rng(cfg.seed, "train_pope")
    k = cfg.pope_per_image
    fit = [(rel, scene) for rel, scene in pool if k > 0 and len({o.name for o in scene.objects}) >= k]
    rows = []
    for i, (rel, scene) in enumerate(fit[: counts["pope_images"]]):
        sampling = benchmarks.POPE_SAMPLINGS[i % len(benchmarks.POPE_SAMPLINGS)]
        rows += benchmarks.pope_rows(f"train-pope-{i:05d}", rel, scene, sampling, k, rng, world, popularity)
    done["pope"] = _write_jsonl(folder / "pope.jsonl", rows)
    done["pope_images"] = min(len(fit), counts["pope_images"])
    rng = _rng(cfg.seed, "long_answers")
    done["long_answers"] = _write_jsonl(folder / "long_answers.jsonl", (
        {"id": f"long-{i:05d}", "image": rel, "question": pick(rng, instructions.DESCRIBE_LONG), "answer": detailed_caption(scene, rng)}
        for i, (rel, scene) in enumerate(pool[: counts["long_answers"]])))
    rng = _rng(cfg.seed, "train_math")
    math_cats = reasoning.categories(world)
    done["math"] = _write_jsonl(folder / "math.jsonl", (
        benchmarks.math_row(f"train-math-{i:05d}", rel, scene, math_cats[i % len(math_cats)], rng, world)
        for i, (rel, scene) in enumerate(pool[: counts["math"]])))
    return done


def _preference(cfg: SynthConfig, world: SceneSampler, out: Path, progress: bool) -> dict:
    rows = _scene_rows(cfg.seed, "preference", cfg.num_preference, "pref-{:05d}", world,
                       _Images(out / "preference", cfg), progress,
                       lambda i, rid, rel, scene, rng: preference.preference_row(rid, rel, scene, rng, world))
    return {"pairs": _write_jsonl(out / "preference" / "pairs.jsonl", rows)}


def _vision(cfg: SynthConfig, world: SceneSampler, out: Path, progress: bool) -> dict:
    """Images with every object's attributes: ground truth a vision tower can be pretrained on."""
    rows = _scene_rows(cfg.seed, "vision", cfg.num_vision, "vis-{:06d}", world, _Images(out / "vision", cfg),
                       progress, lambda i, rid, rel, scene, rng: {"id": rid, "image": rel, **scene.to_dict()})
    return {"images": _write_jsonl(out / "vision" / "objects.jsonl", rows)}


def _text(cfg: SynthConfig, world: SceneSampler, out: Path) -> dict:
    lines = corpus.corpus_lines(cfg.num_text, _rng(cfg.seed, "text"), world)
    (out / "text").mkdir(parents=True, exist_ok=True)
    (out / "text" / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"lines": len(lines), "words": sum(len(line.split()) for line in lines)}


def _as_recipe(cfg: Recipe | SynthConfig) -> DictConfig:
    """Accept a full recipe, its ``synth`` section, or a SynthConfig dataclass."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    if "synth" in cfg:
        return cfg
    recipe = load_recipe(None)
    recipe.synth = cfg
    return recipe


def generate_world(cfg: Recipe | SynthConfig, out_dir: str | os.PathLike, *, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the synthetic world into ``out_dir``; returns the counts also stored in manifest.json.

    ``cfg``: a recipe (DictConfig with ``synth``), its ``synth`` section, or a SynthConfig.
    """
    recipe = _as_recipe(cfg)
    s = OmegaConf.to_object(recipe.synth)  # plain dataclass: attribute access in hot loops is cheap
    for name in ("num_captions", "num_sft", "num_mcq", "num_vqa", "num_pope_images", "num_preference", "num_text",
                 "num_vision", "num_train_mcq", "num_train_vqa", "num_train_pope_images", "num_long_answers",
                 "num_math", "num_math_steps", "num_train_math", "num_multi"):
        if getattr(s, name) < 0:
            raise UserError(f"synth.{name} must be >= 0")
    if s.samples_per_shard < 1 or s.image_size < 8:
        raise UserError("synth.samples_per_shard must be >= 1 and synth.image_size >= 8")
    for name in ("sft_short_answer_frac", "sft_text_only_frac", "sft_multi_image_frac"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            raise UserError(f"synth.{name} must be between 0 and 1")
    # before anything is written
    s.sft_turn_weights = _checked_mix("synth.sft_turn_weights", s.sft_turn_weights, instructions.TURN_WEIGHTS)
    s.caption_mix = _checked_mix("synth.caption_mix", s.caption_mix, CAPTION_STYLES)
    world = SceneSampler.from_config(s)

    out = Path(out_dir)
    prepare_out_dir(out, overwrite=overwrite)  # --overwrite replaces a previous world's folders below
    tmp = out / f".synth-tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary: dict = {}
        summary["captions"], popularity = _captions(s, world, tmp, progress)
        summary["sft"] = _sft(s, world, tmp, progress)
        summary["eval"] = _eval(s, world, tmp, popularity, progress)
        summary["preference"] = _preference(s, world, tmp, progress)
        summary["questions"] = _train_questions(s, world, tmp, popularity, progress, counts={
            "mcq": s.num_train_mcq, "vqa": s.num_train_vqa, "pope_images": s.num_train_pope_images,
            "long_answers": s.num_long_answers, "math": s.num_train_math})
        summary["text"] = _text(s, world, tmp)
        summary["vision"] = _vision(s, world, tmp, progress)
        for name in (*OUTPUT_DIRS, "manifest.json", "config.yaml"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        for name in OUTPUT_DIRS:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save_resolved(recipe, out)
    write_manifest(
        out,
        "synth",
        inputs=None,
        config=recipe,
        counts=summary,
        seed=int(s.seed),
        outputs={
            "caption_shards": "captions/{00000..%05d}.tar" % max(0, summary["captions"]["shards"] - 1),
            "faults": "captions/faults.jsonl",
            "scenes": "captions/scenes.jsonl",
            "sft": "sft/llava.json",
            "mcq": "eval/mcq.jsonl",
            "vqa": "eval/vqa.jsonl",
            "pope": "eval/pope.jsonl",
            "math": "eval/math.jsonl",
            "math_steps": "eval/math_steps.jsonl",
            "multi": "eval/multi.jsonl",
            "eval_scenes": "eval/scenes.jsonl",
            "preference": "preference/pairs.jsonl",
            "train_mcq": "questions/mcq.jsonl",
            "train_vqa": "questions/vqa.jsonl",
            "train_pope": "questions/pope.jsonl",
            "long_answers": "questions/long_answers.jsonl",
            "train_math": "questions/math.jsonl",
            "train_scenes": "questions/scenes.jsonl",
            "text": "text/corpus.txt",
            "vision": "vision/objects.jsonl",
        },
    )
    return summary
