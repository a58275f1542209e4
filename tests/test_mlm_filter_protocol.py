"""The published MLM-Filter protocol of `curate score --scorer mlm` (curate.score.mlm_protocol=mlm_filter).

The literals below are copied by hand from github.com/Victorwz/MLM_Filter,
mlm_filter_scoring_datacomp_batch_inference_v2.py (commit 7c4cd80fc1628278dcf09535b87269352c811961),
and LLaVA-Unified's llava/conversation.py conv_qwen_instruct (commit 144bc93d85606c8a155183a9f9ffb2ceb56a98f7).
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from fixtures_curate import make_world
from fixtures_model import tiny_checkpoint

from vlmforge.cli import main
from vlmforge.shards import iter_raw_samples, list_shards

PUBLISHED_TEMPLATE = """Text Caption: {caption}

{criteria} A higher score indicates higher level of {aspect}. Ensure that your scoring is nuanced and uses the entire range from 0 to 100, reflecting the subtle differences. The score should be given as an integer, with each number between 0 and 100 considered as a potential score, avoiding the tendency to round to multiples of 5 or 10. Please first output a single line containing the value indicating the scores. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias."""

PUBLISHED_CRITERIA = {
    "image_text_matching": "Please evaluate if the provided text caption accurately represents the main features and objects of the image. The caption doesn't need to detail every aspect of the image, but it should capture its primary theme. Rate the overall quality of the text caption's match to the image on a scale of 1-100, considering the criteria mentioned.",
    "object_detail_fulfillment": "Please evaluate the text caption to determine if it provides detailed descriptions of objects that align with the image. Specifically, assess if the caption sufficiently describes the color, size, position, shape, material, etc., of the objects. Afterward, rate the caption's overall accuracy in capturing object details from the image on a scale of 1-100, based on the criteria provided.",
    "caption_text_quality": "Please evaluate the text caption based on the following criteria: Grammatical Correctness, Diversity of Vocabulary (e.g., the range and uniqueness of words used), Fluency (e.g., smoothness and natural flow of sentences), Readability, Length, and Structure. Assign an overall quality score on a scale of 1-100.",
    "semantic_understanding": """Evaluate the given text caption in relation to its corresponding image. Your goal is to determine if the text caption provides additional semantic information that isn't readily apparent just from the image itself.

For example:

1. If the image mentions "a man" but the caption elaborates he is a "homeless man" or a "businessman," then the caption is enriching the semantic context.
2. If the caption introduces concepts like the mathematical tangent function, which require in-depth knowledge to deduce, it is imparting external semantics.
3. Captions revealing specific location addresses, festival details, or other nuanced data not easy to infer from the image also provide external semantic information.
4. Directly identifying specific entities in the image such as buildings, people, bird species, animal breeds, car models, engines, etc., in the caption introduces additional insights.
5. Should the image act as a contextual backdrop and the caption describes elements not explicitly showcased in the image, it has semantic depth.
6. Lastly, if the caption depicts relationships between the subjects in the image, which need commonsense knowledge to understand, it should be considered semantically rich.

Please assess and determine the extent of semantic enrichment the caption provides over the image. Rate the text caption's semantic depth on a scale from 1 to 100.""",
}


def test_published_texts_verbatim():
    from vlmforge.curate.scorers import mlm

    assert mlm.LLAVA_INSTRUCTION_TEMPLATE == PUBLISHED_TEMPLATE
    assert mlm.MLM_FILTER_CRITERIA == PUBLISHED_CRITERIA
    assert list(mlm.MLM_FILTER_CRITERIA) == list(mlm.METRIC_PROMPTS)  # the same four metric names
    # conv_qwen_instruct: system="<|im_start|>system\nYou are a helpful assistant", roles, sep, MPT style
    assert mlm.QWEN_INSTRUCT_SYSTEM == "<|im_start|>system\nYou are a helpful assistant"
    assert mlm.QWEN_INSTRUCT_ROLES == ("<|im_start|>user\n", "<|im_start|>assistant\n")
    assert mlm.QWEN_INSTRUCT_SEP == "<|im_end|>"


def test_rendered_prompt_is_the_qwen_instruct_conversation():
    from vlmforge.curate.scorers.mlm import mlm_filter_prompt

    want = (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>"
        "<|im_start|>user\n<image>\nText Caption: a red circle\n\n"
        + PUBLISHED_CRITERIA["caption_text_quality"]
        + " A higher score indicates higher level of caption text quality. Ensure that your scoring is nuanced and "
        "uses the entire range from 0 to 100, reflecting the subtle differences. The score should be given as an "
        "integer, with each number between 0 and 100 considered as a potential score, avoiding the tendency to round "
        "to multiples of 5 or 10. Please first output a single line containing the value indicating the scores. In "
        "the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
        "bias.<|im_end|><|im_start|>assistant\n"
    )
    assert mlm_filter_prompt("a red circle", "caption_text_quality") == want


def test_parse_like_open_qwen2vl():
    from vlmforge.curate.scorers.mlm import parse_mlm_filter_score, parse_score

    assert parse_mlm_filter_score("85") == 85.0
    assert parse_mlm_filter_score("85\nThe caption") == 85.0  # the first line
    assert parse_mlm_filter_score("7\n") == 7.0
    assert parse_mlm_filter_score("85,") == 85.0 and parse_mlm_filter_score("85;") == 85.0
    assert parse_mlm_filter_score(" 85") == 85.0
    assert parse_mlm_filter_score("10") == 10.0  # "100" read in 2 tokens: what the published script keeps
    for bad in ("Score: 85", "8.5", "", "high"):
        assert parse_mlm_filter_score(bad) is None
    assert parse_score("Score: 85") == 85.0  # the vlmforge protocol's reading is unchanged


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("judge"))


def test_prompt_ids_expand_image_and_append_whitespace(tiny_judge):
    from vlmforge.curate.scorers.mlm import mlm_filter_prompt, mlm_filter_prompt_ids

    _, model, tok = tiny_judge
    ids = mlm_filter_prompt_ids(model, tok, "a red circle", "image_text_matching")
    before, after = mlm_filter_prompt("a red circle", "image_text_matching").split("<image>")
    want = (tok(before)["input_ids"] + [model.image_token_id] * model.tokens_per_image + tok(after)["input_ids"]
            + [tok(" ")["input_ids"][-1]])
    assert ids == want
    assert tok.decode(ids[-1:]) == " "


def _greedy_reference(model, tok, ids, pv, steps):
    """Greedy continuation by full forwards (no cache), stopping at <|im_end|> / EOS."""
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    out = []
    for _ in range(steps):
        logits = model(torch.tensor([ids + out]), pixel_values=pv)[0, -1].clone()
        logits[model.image_token_id] = float("-inf")
        t = int(logits.argmax())
        if t in stops:
            break
        out.append(t)
    return out


def test_mlm_filter_scorer_greedy_and_ev(tiny_judge):
    from PIL import Image

    from vlmforge.curate.scorers.mlm import (
        MLMJudgeScorer,
        digit_start_mask,
        expected_scores,
        expected_scores_reference,
        mlm_filter_prompt_ids,
        number_ids,
        parse_mlm_filter_score,
    )
    from vlmforge.images import preprocess_batch

    ckpt, model, tok = tiny_judge
    images = [Image.new("RGB", (20, 20), (200, 0, 0)), Image.new("RGB", (24, 24), (0, 0, 200))]
    captions = ["a red circle", "a big blue square at the left"]
    metric = "caption_text_quality"  # the shortest criterion: a short prompt for the tiny CPU model
    sc = MLMJudgeScorer(str(ckpt), device="cpu", metrics=[metric], protocol="mlm_filter", model=model, tokenizer=tok)
    cols = sc.score(sc.prepare(images, captions))
    pv = preprocess_batch(images, model.preprocess_spec())
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, cap in enumerate(captions):
        ids = mlm_filter_prompt_ids(model, tok, cap, metric)
        ref = _greedy_reference(model, tok, ids, pv[i : i + 1], 2)  # the batch is left-padded: same answers
        assert cols[f"{metric}_answer"][i] == tok.decode(ref, skip_special_tokens=True)
        assert cols[f"{metric}_parsed"][i] == parse_mlm_filter_score(cols[f"{metric}_answer"][i])
        ev, mass = expected_scores(model, ids, pv[i : i + 1], number_ids(tok), digit_start_mask(tok))
        assert cols[f"{metric}_ev"][i] == pytest.approx(ev, abs=1e-4)
        assert cols[f"{metric}_mass"][i] == pytest.approx(mass, rel=1e-4)
    # cached + batched EV over bare numbers equals one full forward per candidate
    ids = mlm_filter_prompt_ids(model, tok, captions[0], metric)
    cands = number_ids(tok)
    sub = [cands[i] for i in (0, 5, 9, 10, 42, 99, 100)]
    mask = digit_start_mask(tok)
    assert bool(mask[tok.convert_tokens_to_ids("7")]) and not bool(mask[end])
    a = expected_scores(model, ids, pv[:1], sub, mask)
    b = expected_scores_reference(model, ids, pv[:1], sub, mask)
    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == pytest.approx(b[1], rel=1e-3)
    assert sc.info()["protocol"].startswith("mlm_filter")


def test_open_qwen2vl_semantic_understanding_filter(tmp_path, tiny_judge, monkeypatch):
    """score with the published protocol, then keep semantic understanding >= 85 (Open-Qwen2VL's DataComp filter)."""
    import vlmforge.model.decoding as dec
    from vlmforge.curate.scorers.mlm import MLM_FILTER_SCORE_TOKENS, mlm_filter_prompt_ids

    ckpt, model, tok = tiny_judge
    world = make_world(tmp_path / "w", n=4, per_shard=4, n_mismatch=0, n_exact=0, n_near=0, n_corrupt=0)
    captions = [s.caption for t in list_shards(world["dir"]) for s in iter_raw_samples(t)]
    answers = iter(["85", "84", "9\n", "Score: 90"])  # greedy 2-token answers the judge "gives"
    seen = []

    def fake_generate_ids(m, ids, valid, pv, stops, pad, max_new_tokens, temperature, **k):
        seen.append((ids, valid, max_new_tokens, temperature))
        return [tok.encode(next(answers), add_special_tokens=False) for _ in range(ids.shape[0])]

    monkeypatch.setattr(dec, "generate_ids", fake_generate_ids)
    out = tmp_path / "s"
    assert main(["curate", "score", "--scorer", "mlm", "--model", str(ckpt), "--in", str(world["dir"]),
                 "--out", str(out), "--device", "cpu", "--set", "curate.score.mlm_protocol=mlm_filter",
                 "--set", "curate.score.mlm_metrics=[semantic_understanding]",
                 "--set", "curate.score.mlm_score=parsed"]) == 0
    (ids, valid, max_new, temp), = seen
    assert max_new == MLM_FILTER_SCORE_TOKENS == 2 and temp == 0.0
    for r, cap in enumerate(captions):  # the published prompt ids, left-padded
        want = mlm_filter_prompt_ids(model, tok, cap, "semantic_understanding")
        assert ids[r][valid[r]].tolist() == want
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["semantic_understanding_parsed"] for r in rows] == [85.0, 84.0, 9.0, None]
    assert [r["score"] for r in rows] == [85.0, 84.0, 9.0, None]
    assert all(0 <= r["semantic_understanding_ev"] <= 100 for r in rows)
    assert json.loads((out / "manifest.json").read_text())["counts"]["judge_answers_unparseable"] == 1

    kept = tmp_path / "kept"
    assert main(["curate", "filter", "--in", str(world["dir"]), "--scores", f"mlm={out}",
                 "--keep", "mlm.semantic_understanding_parsed>=85", "--out", str(kept)]) == 0
    keys = [s.meta["source_key"] for t in list_shards(kept) for s in iter_raw_samples(t)]
    assert keys == [rows[0]["key"]]
