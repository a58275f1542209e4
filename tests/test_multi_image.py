"""Conversations with several images, end to end: a two-image record is indexed at its true length,
its images reach the model in marker order (image 1 on the first marker's positions, image 2 on the
second's, checked on the features the projector hands over), it trains; generation and scoring see
the order; eval asks two-image items (0- and k-shot). The world's two-image questions are grounded:
an oracle of this file reads each question and both scenes and gets the written answer."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_model import tiny_model
from fixtures_train import one_torch_thread
from PIL import Image

from vlmforge.config import load_recipe
from vlmforge.data.sft.build import build_index
from vlmforge.data.sft.loader import build_sft_loader
from vlmforge.data.sft.samples import SFTDataset
from vlmforge.eval import evaluate
from vlmforge.eval.specs import BUILTIN_SYNTH, SYNTH_GROUP, parse_task_specs
from vlmforge.imagedecode import decode_image
from vlmforge.images import preprocess_batch
from vlmforge.model.build import build_vlm
from vlmforge.model.decoding import generate, left_padded, prompt_ids
from vlmforge.model.likelihood import answer_logprobs
from vlmforge.synth import multi_image
from vlmforge.synth.language import MCQ_SUFFIX, SHORT_ANSWER_SUFFIX
from vlmforge.synth.world import SHAPE_PLURALS, SceneSampler
from vlmforge.synth.writer import generate_world
from vlmforge.text.tokenization import load_tokenizer
from vlmforge.train.loop import Trainer

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)

POOL = ["model.projector.pool_size=2"]  # 4 visual tokens per image
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "yellow": (230, 200, 30),
          "purple": (140, 50, 180), "orange": (245, 130, 30)}
NAMES = list(COLORS)
SINGULAR = {p: s for s, p in SHAPE_PLURALS.items()}
WORLD = ["synth.num_captions=10", "synth.samples_per_shard=10", "synth.num_sft=30", "synth.num_mcq=4",
         "synth.num_vqa=4", "synth.num_pope_images=2", "synth.num_preference=2", "synth.num_text=5",
         "synth.num_vision=2", "synth.num_train_mcq=4", "synth.num_train_vqa=2", "synth.num_train_pope_images=1",
         "synth.num_long_answers=1", "synth.sft_multi_turn_frac=0.5"]
MULTI = ["synth.num_multi=40", "synth.sft_multi_image_frac=0.4"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


# ------------------------------------------------------------------ index, loader, model, one step

def _colour_data(root: Path) -> Path:
    """One-colour images and records with 2, 1 and 0 images; a record's text names its images'
    colours in marker order ("First red, then blue?"), so a batch row tells which image goes where."""
    (root / "img").mkdir(parents=True)
    for name, rgb in COLORS.items():
        Image.new("RGB", (64, 64), rgb).save(root / "img" / f"{name}.png")
    recs = []
    for i in range(18):
        a, b = NAMES[i % 6], NAMES[(i + 1 + i // 6) % 6]  # ordered pairs, both orders of some
        if i % 6 == 5:  # a one-image record
            recs.append({"image": f"img/{a}.png", "conversations": [
                {"from": "human", "value": f"<image>\nFirst {a}, alone?"}, {"from": "gpt", "value": a}]})
        elif i % 6 == 4:  # text only
            recs.append({"conversations": [{"from": "human", "value": "No image here?"},
                                           {"from": "gpt", "value": "No."}]})
        else:
            recs.append({"image": [f"img/{a}.png", f"img/{b}.png"], "conversations": [
                {"from": "human", "value": f"<image>\n<image>\nFirst {a}, then {b}?"},
                {"from": "gpt", "value": f"{a} {b}"}]})
    (root / "sft.json").write_text(json.dumps(recs))
    return root / "sft.json"


def _colour_of(pixels: torch.Tensor, spec: dict) -> str:
    want = {n: preprocess_batch([Image.new("RGB", (64, 64), rgb)], spec)[0] for n, rgb in COLORS.items()}
    return next(n for n, p in want.items() if torch.allclose(p, pixels))


def test_two_image_records_index_load_and_train_with_images_on_their_own_markers(tmp_path, tok, tiny_tokenizer_dir):
    src = _colour_data(tmp_path)
    cfg = load_recipe(None, [*POOL, "train.stage=sft", "train.max_steps=1", "train.global_batch_size=4",
                             "train.micro_batch_size=2", "train.lr=1e-3", "train.warmup_steps=0",
                             "train.progress_bar=false", "train.tensorboard=false", "train.report=false",
                             f"sft.index={tmp_path / 'idx'}", f"sft.image_root={tmp_path}", "sft.max_len=160",
                             "sft.batching=pack", "sft.num_workers=0"])
    model = build_vlm(cfg.model, tok, seed=0)
    vt = model.tokens_per_image
    m = build_index([src], tmp_path / "idx", visual_tokens=vt, image_root=tmp_path, tokenizer=tiny_tokenizer_dir,
                    lengths="exact", progress=False)
    assert m["counts"]["images"] == 12 * 2 + 3 and m["counts"]["text_only"] == 3 and not m["dropped"]

    # lengths: a record with n images is its text tokens + n * (visual tokens - 1), as the sample is
    ds = SFTDataset(tmp_path / "idx", tok, image_spec=model.preprocess_spec())
    idx = ds.index
    assert sorted(set(idx.n_images.tolist())) == [0, 1, 2]
    for i in range(len(ds)):
        n = int(idx.n_images[i])
        assert int(idx.mm_length[i]) == int(idx.text_tokens[i]) + n * (vt - 1) == ds[i]["input_ids"].size
        assert int((ds[i]["input_ids"] == model.image_token_id).sum()) == n * vt

    # one optimizer step of the real trainer on the real loader; hooks see what the model gets
    seen: dict[str, list] = {"inputs": [], "features": [], "embeds": []}
    hooks = [
        model.register_forward_pre_hook(lambda mod, args, kw: seen["inputs"].append(dict(kw)), with_kwargs=True),
        model.projector.register_forward_hook(lambda mod, args, out: seen["features"].append(out.detach())),
        model.llm.base_model.register_forward_pre_hook(
            lambda mod, args, kw: seen["embeds"].append(kw["inputs_embeds"].detach()), with_kwargs=True),
    ]
    loader = build_sft_loader(cfg, tok, batch_size=2, rank=0, world_size=1)
    before = model.projector.linear_1.weight.detach().clone()
    result = Trainer(cfg.train, model, loader, 1, tmp_path / "run", torch.device("cpu")).fit()
    for h in hooks:
        h.remove()
    assert np.isfinite(result.losses[1]) and not torch.equal(before, model.projector.linear_1.weight)
    assert len(seen["inputs"]) == len(seen["features"]) == len(seen["embeds"]) == 2  # 2 micro-batches

    spec = model.preprocess_spec()
    n_two = 0
    for kw, feats, embeds in zip(seen["inputs"], seen["features"], seen["embeds"]):
        ids, sids, pixels = kw["input_ids"], kw["seq_ids"], kw["pixel_values"]
        k = 0  # images in order of appearance: rows, then samples, then markers
        for r in range(ids.shape[0]):
            for s in range(int(sids[r].max()) + 1):
                where = (sids[r] == s).nonzero().flatten()
                sample = ids[r, where]
                text = tok.decode(sample.tolist(), skip_special_tokens=True)
                named = re.search(r"First (\w+)(?:, then (\w+))?", text)
                colours = [c for c in (named.groups() if named else ()) if c]
                marks = (sample == model.image_token_id).nonzero().flatten()
                assert marks.numel() == len(colours) * vt
                for j, colour in enumerate(colours):  # the j-th marker run holds the j-th image's features
                    assert _colour_of(pixels[k], spec) == colour
                    pos = where[marks[j * vt:(j + 1) * vt]]
                    assert torch.equal(embeds[r, pos], feats[k].to(embeds.dtype))
                    k += 1
                n_two += len(colours) == 2
        assert k == pixels.shape[0] == feats.shape[0]
    assert n_two >= 2


# ------------------------------------------------------------------ generation and scoring

def _images(n: int = 3, seed: int = 0) -> list:
    """Noise images: every patch, and so every visual token, differs."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_generate_puts_each_image_on_its_marker_in_a_mixed_batch(tok):
    model = tiny_model(tok, *POOL, spread=0.3)
    a, b, c = _images()
    two = [{"role": "user", "content": "<image>\n<image>\nWhich image has more circles, the first or the second?"}]
    one = [{"role": "user", "content": "<image>\nWhat color is it?"}]
    none = [{"role": "user", "content": "Is there a red circle?"}]
    prompts, images = [two, one, two, none], [[a, b], [c], [b, a], []]
    feats, embeds = [], []
    h1 = model.projector.register_forward_hook(lambda mod, args, out: feats.append(out.detach()))
    h2 = model.llm.base_model.register_forward_pre_hook(
        lambda mod, args, kw: embeds.append(kw["inputs_embeds"].detach()), with_kwargs=True)
    batched = generate(model, tok, prompts, images, max_new_tokens=6, return_ids=True)
    h1.remove()
    h2.remove()
    assert torch.equal(feats[0], model.encode_images(preprocess_batch([a, b, c, b, a], model.preprocess_spec())))
    # prefill (left padded): the k-th run of placeholders holds the k-th image's features, in prompt order
    rows = [prompt_ids(model, tok, p, len(ims)) for p, ims in zip(prompts, images)]
    ids, _ = left_padded(rows, int(tok.pad_token_id))
    t, k = model.tokens_per_image, 0
    for r in range(len(rows)):
        marks = (ids[r] == model.image_token_id).nonzero().flatten()
        assert marks.numel() == len(images[r]) * t
        for j in range(len(images[r])):
            assert torch.equal(embeds[0][r, marks[j * t:(j + 1) * t]], feats[0][k])
            k += 1
    assert k == 5
    # batching does not change an answer; the order of the two images reaches the answer
    alone = [generate(model, tok, [p], [ims], max_new_tokens=6, return_ids=True)[0] for p, ims in zip(prompts, images)]
    assert alone == batched and len(set(batched[0])) > 1


def _scored(model, tok, messages, images, reply: list[int]) -> tuple[float, bool]:
    """(log P(reply | prompt, images), whether every reply token is the argmax): one forward pass."""
    head = prompt_ids(model, tok, messages, len(images))
    ids = torch.tensor([head + reply])
    with torch.no_grad():
        logits = model(ids, preprocess_batch(images, model.preprocess_spec()))[0, len(head) - 1:-1].float()
    logits[:, model.image_token_id] = float("-inf")  # generation never emits the placeholder
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(reply)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_scoring_sees_the_order_and_agrees_with_generation(tok):
    """Generated with (A, B), the reply is the greedy one when scored with (A, B); scored with the
    images swapped its likelihood is another, unless the swap changes nothing (A = B). Likewise for
    a written answer scored by the likelihood protocol."""
    model = tiny_model(tok, *POOL, spread=0.3)
    a, b = _images(2, seed=1)
    two = [{"role": "user", "content": "<image>\n<image>\nWhich image has more circles, the first or the second?"}]
    for first, second, order_matters in ((a, b, True), (a, a.copy(), False)):
        reply = generate(model, tok, [two], [[first, second]], max_new_tokens=5, return_ids=True)[0]
        assert len(reply) == 5
        lp, greedy = _scored(model, tok, two, [first, second], reply)
        lp_swapped, _ = _scored(model, tok, two, [second, first], reply)
        assert greedy
        assert (abs(lp - lp_swapped) > 1e-4) if order_matters else lp == lp_swapped
        (w, _), (w_swapped, _) = answer_logprobs(model, tok, [two, two], [[first, second], [second, first]],
                                                 ["The first.", "The first."])
        assert (abs(w - w_swapped) > 1e-4) if order_matters else w == w_swapped


# ------------------------------------------------------------------ the world's two-image questions

@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_worlds")
    made = {"multi": MULTI, "plain": [], "eval_only": ["synth.num_multi=40"]}
    for name, extra in made.items():
        generate_world(load_recipe(None, WORLD + extra), root / name)
    return {name: root / name for name in made}


def _count(scene: dict, plural: str) -> int:
    """How many objects fit 'circles' / 'red shapes' / 'shapes'."""
    words = plural.split()
    objs = scene["objects"]
    if words == ["shapes"]:
        return len(objs)
    if words[-1] == "shapes":
        return sum(o["color"] == words[0] for o in objs)
    return sum(o["shape"] == SINGULAR[words[-1]] for o in objs)


def _shows(scene: dict, name: str) -> bool:
    *colour, shape = name.split()
    return any(o["shape"] == shape and (not colour or o["color"] == colour[0]) for o in scene["objects"])


def oracle(question: str, first: dict, second: dict) -> str:
    """The answer from the two scenes' ground truth, asserting the premise that makes the
    question need both images."""
    if m := re.fullmatch(r"Which image has more (.+), the first or the second\?", question):
        a, b = _count(first, m[1]), _count(second, m[1])
        assert a != b
        return "first" if a > b else "second"
    if m := re.fullmatch(r"Which image shows an? (.+), the first or the second\?", question):
        a, b = _shows(first, m[1]), _shows(second, m[1])
        assert a != b
        return "first" if a else "second"
    if m := re.fullmatch(r"Is the (\w+) in the first image the same color as the (\w+) in the second image\?", question):
        assert m[1] == m[2]
        ca = [o["color"] for o in first["objects"] if o["shape"] == m[1]]
        cb = [o["color"] for o in second["objects"] if o["shape"] == m[1]]
        assert len(ca) == len(cb) == 1
        return "yes" if ca == cb else "no"
    if m := re.fullmatch(r"Is there an? (.+) in both images\?", question):
        a, b = _shows(first, m[1]), _shows(second, m[1])
        assert a or b
        return "yes" if a and b else "no"
    if m := re.fullmatch(r"How many (.+) are there in the two images together\?", question):
        a, b = _count(first, m[1]), _count(second, m[1])
        assert a > 0 and b > 0
        return str(a + b)
    raise AssertionError(f"not a two-image question: {question!r}")


def _swap(category: str, answer: str) -> str:
    flip = {"first": "second", "second": "first"}
    return flip[answer] if category in multi_image.ORDERED else answer


def test_eval_rows_are_grounded_balanced_and_held_out(worlds):
    w = worlds["multi"]
    rows = _jsonl(w / "eval" / "multi.jsonl")
    scenes = {r["image"]: r["scene"] for r in _jsonl(w / "eval" / "scenes.jsonl")}
    assert len(rows) == 40
    assert {r["category"] for r in rows} == set(multi_image.CATEGORIES)
    for r in rows:
        first, second = (scenes[p] for p in r["images"])
        truth = oracle(r["question"], first, second)
        assert r["answer_text"] == truth == r["options"][r["answer"]]
        assert oracle(r["question"], second, first) == _swap(r["category"], truth)  # what swapping does
        assert r["prompt"] == "\n".join([r["question"], *(f"{k}. {v}" for k, v in r["options"].items()), MCQ_SUFFIX])
        assert len(r["options"]) == (4 if r["category"] == "total" else 2)
        assert all((w / "eval" / p).is_file() for p in r["images"]) and r["images"][0] != r["images"][1]
    for cat, answers in multi_image.ANSWERS.items():  # the wanted answer is drawn uniformly: both occur
        assert {r["answer_text"] for r in rows if r["category"] == cat} == set(answers), cat

    def hashes(folder, prefix=""):
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "images").glob(f"{prefix}*")}

    multi_h = hashes(w / "eval", "multi-")
    assert len(multi_h) == 80 and not multi_h & (hashes(w / "sft") | hashes(w / "questions"))
    m = json.loads((w / "manifest.json").read_text())
    assert m["counts"]["eval"]["multi"] == 40 and m["outputs"]["multi"] == "eval/multi.jsonl"


def test_sft_two_image_conversations_are_grounded():
    """Straight from the module on sampled pairs: every reply, in each of the three formats."""
    world = SceneSampler(["circle", "square", "triangle", "star"], ["red", "green", "blue", "yellow"], 1, 5,
                         repeat_prob=0.4)
    rng = np.random.default_rng(0)
    formats = set()
    for i in range(60):
        cat = multi_image.CATEGORIES[i % len(multi_image.CATEGORIES)]
        first, second, qa = multi_image.draw(cat, rng, world)
        assert qa.category == cat
        rec = multi_image.conversation(f"r{i}", ["a.jpg", "b.jpg"], first, second, qa, rng, world, 3)
        assert rec["image"] == ["a.jpg", "b.jpg"] and rec["categories"][0] == f"multi_{cat}"
        convs = rec["conversations"]
        assert convs[0]["value"].startswith("<image>\n<image>\n")
        assert sum(c["value"].count("<image>") for c in convs) == 2
        sf, ss = first.to_dict(), second.to_dict()
        for human, gpt in zip(convs[::2], convs[1::2]):
            text = human["value"].replace("<image>\n", "")
            lines = text.split("\n")
            truth = oracle(lines[0], sf, ss)
            if lines[-1] == MCQ_SUFFIX:
                options = dict(line.split(". ", 1) for line in lines[1:-1])
                assert options[gpt["value"]] == truth
                formats.add("mcq")
            elif lines[-1] == SHORT_ANSWER_SUFFIX:
                assert gpt["value"] == truth.capitalize()
                formats.add("short")
            else:
                reply = gpt["value"]
                if truth in ("yes", "no"):
                    assert reply.startswith(truth.capitalize() + ",")
                elif truth in ("first", "second"):
                    assert reply.startswith(f"The {truth} image ")
                else:
                    assert re.match(rf"There (is|are) {truth} ", reply)
                formats.add("long")
    assert formats == {"mcq", "short", "long"}


def test_sft_file_holds_two_image_records_that_index(worlds, tmp_path, tiny_tokenizer_dir):
    w = worlds["multi"]
    recs = json.loads((w / "sft" / "llava.json").read_text())
    two = [r for r in recs if isinstance(r.get("image"), list)]
    assert len(recs) == 30 and len(two) == 12  # 0.4 of 30
    assert all(len(r["image"]) == 2 and r["conversations"][0]["value"].startswith("<image>\n<image>\n") for r in two)
    assert json.loads((w / "manifest.json").read_text())["counts"]["sft"]["two_image"] == 12
    m = build_index([w / "sft" / "llava.json"], tmp_path / "idx", visual_tokens=4, image_root=w / "sft",
                    tokenizer=tiny_tokenizer_dir, lengths="exact", progress=False)
    assert not m["dropped"] and m["counts"]["images"] == 18 + 2 * 12


def test_worlds_without_the_new_counts_keep_their_files(worlds):
    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
                if p.is_file() and p.name not in ("manifest.json", "config.yaml")}

    plain, eval_only, multi = (files(worlds[k]) for k in ("plain", "eval_only", "multi"))
    assert plain["eval/multi.jsonl"] == b""
    # the eval file adds images and appends scenes (training questions avoid them); nothing else moves
    changed = ("eval/multi.jsonl", "eval/scenes.jsonl")
    same = [k for k in plain if not k.startswith("questions/") and k not in changed]
    assert same and all(eval_only[k] == plain[k] for k in same)
    assert eval_only["eval/scenes.jsonl"].startswith(plain["eval/scenes.jsonl"])
    # two-image SFT conversations take the place of the last one-image ones
    a = json.loads(plain["sft/llava.json"])
    b = json.loads(multi["sft/llava.json"])
    assert b[:18] == a[:18] and b[18:] != a[18:]
    assert all(multi[k] == plain[k] for k in plain if k.startswith("sft/images/") and k in multi)


def test_builtin_task_and_settings_are_checked(worlds, tmp_path):
    from vlmforge.cli import main

    assert BUILTIN_SYNTH["synth-multi"] == ("mcq", "multi.jsonl") and "synth-multi" not in SYNTH_GROUP
    (spec,) = parse_task_specs("synth-multi", worlds["multi"])
    assert (spec.kind, Path(spec.path)) == ("mcq", worlds["multi"] / "eval" / "multi.jsonl")
    for bad in ("synth.num_multi=-1", "synth.sft_multi_image_frac=1.5"):
        assert main(["synth", "--out", str(tmp_path / "w"), "--quiet", "--set", bad]) == 2


# ------------------------------------------------------------------ eval of two-image items

def _scene_by_pixels(w: Path) -> dict[str, dict]:
    out = {}
    for r in _jsonl(w / "eval" / "scenes.jsonl"):
        im = decode_image((w / "eval" / r["image"]).read_bytes())
        out[hashlib.sha256(np.asarray(im).tobytes()).hexdigest()] = r["scene"]
    return out


def test_eval_asks_both_images_in_order(worlds):
    """An oracle that looks at the images it is given answers every item; one that reads them in
    the wrong order fails exactly the questions whose answer names an image."""
    w = worlds["multi"]
    by_pixels = _scene_by_pixels(w)

    def oracle_fn(swap: bool):
        def answer(prompts, images):
            out = []
            for messages, ims in zip(prompts, images):
                user = messages[-1]["content"]
                assert user.startswith("<image>\n<image>\n") and user.count("<image>") == 2
                lines = user.replace("<image>\n", "").split("\n")
                options = dict(line.split(". ", 1) for line in lines[1:-1])
                first, second = (by_pixels[hashlib.sha256(np.asarray(im).tobytes()).hexdigest()] for im in ims[-2:])
                if swap:
                    first, second = second, first
                truth = oracle(lines[0], first, second)
                out.append(next(k for k, v in options.items() if v == truth))
            return out
        return answer

    right = evaluate(tasks="synth-multi", synth_dir=w, generate_fn=oracle_fn(False), progress=False)["synth-multi"]
    assert right["metrics"]["accuracy"] == 1.0 and right["counts"]["n"] == 40
    assert right["chance"]["accuracy"] == pytest.approx((32 * 0.5 + 8 * 0.25) / 40)
    wrong = evaluate(tasks="synth-multi", synth_dir=w, generate_fn=oracle_fn(True), progress=False)["synth-multi"]
    got = {c: wrong["metrics"][f"accuracy/{c}"] for c in multi_image.CATEGORIES}
    assert got == {c: 0.0 if c in multi_image.ORDERED else 1.0 for c in multi_image.CATEGORIES}


def test_a_model_evaluates_two_image_items_zero_and_one_shot(worlds, tmp_path, tok):
    model = tiny_model(tok, *POOL, spread=0.3)
    res = evaluate(model, tok, "synth-multi", synth_dir=worlds["multi"], limit=4, shots=(0, 1), seeds=(0,),
                   max_new_tokens=3, mc_protocols=("generate", "likelihood"), progress=False, out_dir=tmp_path / "ev")
    assert set(res) == {"synth-multi", "synth-multi@1shot", "synth-multi@likelihood"}
    assert all(r["counts"]["n"] == 4 and not r["skipped"] for r in res.values())
    rows = _jsonl(tmp_path / "ev" / "predictions.jsonl")
    assert {(r["shots"], r["n_images"]) for r in rows} == {(0, 2), (1, 4)}  # a demonstration brings its two
    assert all(r["prompt"].startswith("<image>\n<image>\n") for r in rows)
