"""Prompts with InternVL dynamic tiles: generation, likelihood, the critic, eval's prompt length and
the MLM judge build their inputs through the model's ImageLayout (tiles x tokens per tile, wrapped
in model.images.start / end) and feed the tiles as pixel_values; the fixed grid is unchanged."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from fixtures_model import tiny_model
from PIL import Image

from vlmforge.arch.tokens import IM_END
from vlmforge.config import load_recipe
from vlmforge.critic.score import StepRequest, step_scores
from vlmforge.curate.scorers.mlm import MLMJudgeScorer, expected_scores, judge_messages
from vlmforge.eval import evaluate
from vlmforge.eval.items import ImageRef
from vlmforge.eval.runner import model_prompt_length
from vlmforge.eval.specs import TaskSpec
from vlmforge.eval.tasks import load_task
from vlmforge.images import dynamic_tiles, preprocess_batch
from vlmforge.model.build import build_vlm
from vlmforge.model.decoding import end_of_turn_ids, generate, generate_ids, left_padded, prompt_ids
from vlmforge.model.likelihood import answer_logprobs, continuation_logprobs
from vlmforge.text.chat import encode_conversation
from vlmforge.text.tokenization import load_tokenizer

TILED = ("model.projector.pool_size=2", "model.images.tiles=true", "model.images.max_tiles=4",
         "model.images.start=<img>", "model.images.end=</img>")
TOKENS_PER_TILE = 4  # tiny-siglip: 64 px, 8x8 patches, pooled 2x2
ASK = [{"role": "user", "content": "<image>What is in the picture?"}]


def noise(w: int, h: int, seed: int) -> Image.Image:
    """An image whose tiles all differ (a flat colour would make every tile the same)."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, *TILED, spread=0.3)


def wrap(tok, text):
    return tok.encode(text, add_special_tokens=False)


def by_hand(model, tok, messages, tiles_per_image):
    """The prompt ids built by hand: each marker -> <img> ids + tiles x 4 placeholders + </img> ids."""
    ids, _ = encode_conversation(tok, messages, add_generation_prompt=True)
    out, k = [], 0
    for i in ids:
        if i == model.image_token_id:
            out += wrap(tok, "<img>") + [i] * (tiles_per_image[k] * TOKENS_PER_TILE) + wrap(tok, "</img>")
            k += 1
        else:
            out.append(i)
    return out


def greedy_by_hand(model, tok, ids, pv, n):
    """Greedy decoding with a full forward per token (no cache, no padding)."""
    stops, new = set(end_of_turn_ids(tok)), []
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), pv)[0, -1]
        logits[model.image_token_id] = float("-inf")
        t = int(logits.argmax())
        if t in stops:
            break
        new.append(t)
        ids.append(t)
    return new


def test_generate_on_a_wide_image_is_the_forward_on_the_hand_built_input(model, tok):
    img = noise(128, 64, 0)  # 2:1 -> grid 2x1 = 2 tiles + thumbnail = 3 tiles of 64 px
    tiles = dynamic_tiles(img, 64, 1, 4, True)
    assert len(tiles) == 3
    ids = by_hand(model, tok, ASK, [3])
    assert prompt_ids(model, tok, ASK, [img]) == ids == prompt_ids(model, tok, ASK, [(128, 64)])
    assert ids.count(model.image_token_id) == 12
    pv = preprocess_batch(tiles, model.preprocess_spec())
    got = generate(model, tok, [ASK], [[img]], max_new_tokens=8, return_ids=True)[0]
    assert got == greedy_by_hand(model, tok, ids, pv, 8)
    assert len(set(got)) > 2  # a non-degenerate sequence was compared
    # the tiles matter: the same prompt with the image as one resized tile answers differently
    one = preprocess_batch([img.resize((64, 64))] * 3, model.preprocess_spec())
    assert greedy_by_hand(model, tok, ids, one, 8) != got


def test_wrap_tokens_sit_around_each_image_block(model, tok):
    two = [{"role": "user", "content": "<image>\n<image>\nWhich is brighter?"}]
    ids = prompt_ids(model, tok, two, [(128, 64), (64, 128)])
    start, end, img = wrap(tok, "<img>"), wrap(tok, "</img>"), model.image_token_id
    runs, j = [], 0
    while j < len(ids):
        if ids[j] != img:
            j += 1
            continue
        k = j
        while k < len(ids) and ids[k] == img:
            k += 1
        assert ids[j - len(start) : j] == start and ids[k : k + len(end)] == end
        runs.append(k - j)
        j = k
    # budget max(1, 4 // 2) = 2 tiles each: 2x1 and 1x2 grids, each + thumbnail = 3 tiles
    assert runs == [3 * TOKENS_PER_TILE, 3 * TOKENS_PER_TILE]


@pytest.mark.parametrize("positions", ["restart", "v2pe"])
def test_cached_equals_uncached_and_batching_equals_alone(tok, positions):
    model = tiny_model(tok, *TILED, f"model.positions={positions}", "model.v2pe_delta=0.5", spread=0.3)
    prompts = [ASK, [{"role": "user", "content": "Describe it. <image>"}], ASK,
               [{"role": "user", "content": "Is there a red circle?"}]]
    images = [[noise(128, 64, 1)], [noise(64, 64, 2)], [noise(200, 50, 3)], []]  # 3, 1, 5 tiles, none
    cached = generate(model, tok, prompts, images, max_new_tokens=8, return_ids=True)
    plain = generate(model, tok, prompts, images, max_new_tokens=8, use_cache=False, return_ids=True)
    assert cached == plain
    for i in range(len(prompts)):  # left padding does not change a prompt's answer
        assert generate(model, tok, prompts[i : i + 1], images[i : i + 1], max_new_tokens=8, return_ids=True) == [cached[i]]
    assert len({len(prompt_ids(model, tok, p, ims)) for p, ims in zip(prompts, images)}) == 4


def test_multi_image_prompt_through_generate_and_likelihood(model, tok):
    two = [{"role": "user", "content": "<image>\n<image>\nWhich is brighter?"}]
    ims = [noise(128, 64, 4), noise(64, 128, 5)]
    ids = by_hand(model, tok, two, [3, 3])
    assert prompt_ids(model, tok, two, ims) == ids
    tiles = dynamic_tiles(ims[0], 64, 1, 2, True) + dynamic_tiles(ims[1], 64, 1, 2, True)
    pv = preprocess_batch(tiles, model.preprocess_spec())
    got = generate(model, tok, [two, ASK], [ims, [noise(96, 64, 6)]], max_new_tokens=6, return_ids=True)
    assert got[0] == greedy_by_hand(model, tok, ids, pv, 6)
    cands = ["the first", "the second"]
    scores = continuation_logprobs(model, tok, [two], [ims], [cands], any_first_case=False)[0]
    end = tok.convert_tokens_to_ids(IM_END)
    for c, score in zip(cands, scores):
        tail = tok(c, add_special_tokens=False)["input_ids"] + [end]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids + tail]), pv), -1)[0]
        want = sum(float(logp[len(ids) + j - 1, t]) for j, t in enumerate(tail))
        assert score == pytest.approx(want, abs=1e-4)
    (lp, _), = answer_logprobs(model, tok, [two], [ims], ["the first"], end_of_turn=True)
    assert lp == pytest.approx(scores[0], abs=1e-4)


def test_a_count_is_refused_when_the_model_tiles_and_kept_otherwise(model, tok):
    with pytest.raises(ValueError, match="prompt 3: the model tiles images"):
        prompt_ids(model, tok, ASK, 1, 3)
    assert prompt_ids(model, tok, [{"role": "user", "content": "hi"}], 0) == prompt_ids(
        model, tok, [{"role": "user", "content": "hi"}], [])
    with pytest.raises(ValueError, match="prompt 1: 1 <image> marker"):
        prompt_ids(model, tok, ASK, [(64, 64), (64, 64)], 1)


def test_fixed_grid_ids_and_generations_are_todays(tok):
    """Untiled, no wrap: each marker is tokens_per_image ids and pixel_values the images, as before."""
    model = tiny_model(tok, "model.projector.pool_size=2", spread=0.3)
    prompts = [ASK, [{"role": "user", "content": "Describe the image. <image>"}], [{"role": "user", "content": "Hi?"}]]
    images = [[noise(64, 64, 7)], [noise(50, 80, 8)], []]
    rows = []
    for m in prompts:  # the previous prompt_ids, inlined
        ids, _ = encode_conversation(tok, m, add_generation_prompt=True)
        rows.append([t for i in ids for t in ([i] * model.tokens_per_image if i == model.image_token_id else [i])])
    for m, ims, row in zip(prompts, images, rows):
        assert prompt_ids(model, tok, m, ims) == prompt_ids(model, tok, m, len(ims)) == row
    ids, valid = left_padded(rows, int(tok.pad_token_id))
    pv = preprocess_batch([im for ims in images for im in ims], model.preprocess_spec())
    before = generate_ids(model, ids, valid, pv, set(end_of_turn_ids(tok)), int(tok.pad_token_id), max_new_tokens=10)
    assert generate(model, tok, prompts, images, max_new_tokens=10, return_ids=True) == before
    sampled = generate(model, tok, prompts, images, max_new_tokens=10, temperature=1.0, seed=5, return_ids=True)
    assert sampled == generate_ids(model, ids, valid, pv, set(end_of_turn_ids(tok)), int(tok.pad_token_id),
                                   max_new_tokens=10, temperature=1.0, seed=5)


def test_critic_scores_tiled_images_batch_invariant(model, tok):
    reqs = [StepRequest("How many shapes?", [noise(128, 64, 9)], ["There is one.", "So 1."]),
            StepRequest("What colour?", [noise(64, 64, 10)], ["Red."]),
            StepRequest("Compare them.", [noise(200, 50, 11), noise(64, 128, 12)], ["The first.", "Done."])]
    together = step_scores(model, tok, reqs, batch_size=3)
    alone = [step_scores(model, tok, [r], batch_size=1)[0] for r in reqs]
    assert [len(s) for s in together] == [2, 1, 2]
    assert together == [pytest.approx(a, abs=1e-5) for a in alone]


def test_eval_prompt_length_counts_tiles(model, tok, tmp_path):
    paths = []
    for k, (w, h) in enumerate([(128, 64), (200, 50)]):
        paths.append(tmp_path / f"{k}.png")
        noise(w, h, k).save(paths[-1])
    length = model_prompt_length(model, tok)
    refs = [ImageRef("path", str(p)) for p in paths]
    assert length(ASK, refs[:1]) == len(prompt_ids(model, tok, ASK, [(128, 64)]))
    assert length(ASK, refs[1:]) - length(ASK, refs[:1]) == (5 - 3) * TOKENS_PER_TILE
    assert length(ASK, [ImageRef("path", str(tmp_path / "missing.png"))]) == 0  # generation reports it


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A tiny JPEG whose frame header (SOF0) claims width x height."""
    buf = io.BytesIO()
    noise(16, 12, 0).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_huge_image_in_a_tiled_eval_is_counted_as_image_too_large(model, tok, tmp_path):
    """20000x20000 (over twice PIL's bomb limit: its open() raises DecompressionBombError) and
    10000x10000 (over vlmforge's cap): the tiled prompt length cannot read their tiles; both items
    are dropped and counted as image_too_large, the others scored."""
    (tmp_path / "img").mkdir()
    noise(128, 64, 1).save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "bomb.jpg").write_bytes(_jpeg_claiming(20_000, 20_000))
    (tmp_path / "img" / "big.jpg").write_bytes(_jpeg_claiming(10_000, 10_000))
    rows = [{"id": f"q{i}", "image": f"img/{name}", "question": "Colour?", "answers": ["red"] * 10}
            for i, name in enumerate(["ok.png", "bomb.jpg", "big.jpg"])]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    length = model_prompt_length(model, tok)
    refs = [ImageRef("path", str(tmp_path / "img" / n)) for n in ("bomb.jpg", "big.jpg")]
    assert [length(ASK, [r]) for r in refs] == [0, 0]
    task = load_task(TaskSpec("vqa", "vqa", str(tmp_path / "vqa.jsonl")))
    res = evaluate(model, tok, [task], strict=False, progress=False, max_new_tokens=2)["vqa"]
    assert res["skipped"] == {"image_too_large": 2} and res["counts"]["n"] == 1


def test_mlm_judge_feeds_each_image_its_tiles(model, tok):
    images = [noise(128, 64, 13), noise(64, 64, 14)]
    sc = MLMJudgeScorer("tiny", device="cpu", metrics=["caption_text_quality"], model=model, tokenizer=tok)
    cols = sc.score(sc.prepare(images, ["a red circle", "a blue square"]))
    for i, im in enumerate(images):
        ids = prompt_ids(model, tok, judge_messages(["a red circle", "a blue square"][i], "caption_text_quality"), [im])
        pv = preprocess_batch(dynamic_tiles(im, 64, 1, 4, True), model.preprocess_spec())
        ev, _ = expected_scores(model, ids, pv, sc.cands, sc.number_end)
        assert cols["caption_text_quality_ev"][i] == pytest.approx(ev, abs=1e-4)


def test_internvl3_sft_recipe_tiles_and_a_tiny_variant_generates(tok):
    cfg = load_recipe("internvl3/sft")
    im = cfg.model.images
    assert (im.tiles, im.min_tiles, im.max_tiles, im.thumbnail, im.start, im.end) == (True, 1, 12, True, "<img>", "</img>")
    assert (cfg.sft.max_len, cfg.sft.batching, cfg.sft.jpeg_augment, cfg.train.loss_reduction) == (16384, "pack", True, "square")
    tiny = load_recipe("internvl3/sft", ["model.vision.preset=tiny-internvit", "model.vision.pretrained=null",
                                         "model.vision.image_size=null", "model.llm.preset=tiny-qwen2",
                                         "model.llm.pretrained=null"])
    model = build_vlm(tiny.model, tok, seed=0).eval()
    assert model.image_layout(tok).tiling.tile == 64 and model.tokens_per_image == 16
    img = noise(256, 64, 15)  # 4:1 -> grid 4x1 + thumbnail = 5 tiles
    assert prompt_ids(model, tok, ASK, [img]).count(model.image_token_id) == 5 * 16
    cached = generate(model, tok, [ASK], [[img]], max_new_tokens=4, return_ids=True)
    assert cached == generate(model, tok, [ASK], [[img]], max_new_tokens=4, use_cache=False, return_ids=True)
