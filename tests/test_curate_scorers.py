"""curate score (clip / siglip / dfn / mlm) and train-filter on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_curate import make_world, tiny_contrastive
from fixtures_model import tiny_checkpoint

from vlmforge.cli import main
from vlmforge.imagedecode import decode_image
from vlmforge.shards import iter_raw_samples, list_shards


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("scorers") / "world", n=24, per_shard=10, n_mismatch=2,
                      n_exact=1, n_near=1, n_corrupt=1)


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_contrastive_scorer_is_cosine(tmp_path, world, tiny_tokenizer_dir, arch):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    mdir = tiny_contrastive(arch, tiny_tokenizer_dir, tmp_path / "m")
    out = tmp_path / "scores"
    assert main(["curate", "score", "--scorer", "clip", "--model", str(mdir), "--in", str(world["dir"]),
                 "--out", str(out), "--batch-size", "4", "--num-workers", "2", "--device", "cpu"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"] == {"in": world["n"], "scored": world["n"] - 1, "not_scored": 1, "reconciled": True}
    assert m["dropped"] == {"corrupt": 1}

    # Reference: the model's own feature functions, one sample at a time.
    model = AutoModel.from_pretrained(mdir).eval()
    proc, tok = AutoImageProcessor.from_pretrained(mdir), AutoTokenizer.from_pretrained(mdir)
    shard = list_shards(world["dir"])[0]
    table = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["key"] for r in table] == [s.key for s in iter_raw_samples(shard)]  # input order kept
    for s, row in zip(iter_raw_samples(shard), table):
        pix = proc(images=[decode_image(s.image_bytes)], return_tensors="pt")["pixel_values"]
        if arch == "siglip":
            ids = tok([s.caption], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
            txt = {"input_ids": ids["input_ids"]}
        else:
            ids = tok([s.caption], return_tensors="pt")
            assert ids["input_ids"][0, -1] == tok.eos_token_id  # EOS appended: CLIP pools it
            txt = dict(ids)
        with torch.no_grad():
            a = model.get_image_features(pixel_values=pix).pooler_output
            b = model.get_text_features(**txt).pooler_output
        want = torch.nn.functional.cosine_similarity(a, b).item()
        assert row["score"] == pytest.approx(want, abs=1e-5)
        assert row["uid"] == s.meta["uid"]


def test_train_filter_and_dfn_scoring(tmp_path, world):
    from transformers import CLIPModel

    from vlmforge.config import load_recipe
    from vlmforge.model.tower import build_vision_tower

    fdir = tmp_path / "dfn"
    assert main(["curate", "train-filter", "--in", str(world["dir"]), "--out", str(fdir), "--epochs", "2",
                 "--exclude-faults", str(world["dir"] / "faults.jsonl"), "--device", "cpu",
                 "--set", "curate.train_filter.batch_size=8", "--set", "curate.train_filter.holdout_frac=0.2"]) == 0
    for f in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json",
              "calibration.json", "manifest.json", "config.yaml"):
        assert (fdir / f).is_file(), f
    man = json.loads((fdir / "manifest.json").read_text())
    assert man["counts"]["excluded"] == len(world["faults"])
    assert isinstance(CLIPModel.from_pretrained(fdir), CLIPModel)
    # its vision tower initialises a VLM's tower (model.vision.pretrained=<filter folder>)
    cfg = load_recipe(None, ["model.vision.preset=tiny-clip", f"model.vision.pretrained={fdir}"])
    tower = build_vision_tower(cfg.model.vision)
    assert tower.config.hidden_size == 64 and tower.config.image_size == 64

    scores = tmp_path / "s"
    assert main(["curate", "score", "--scorer", "dfn", "--model", str(fdir), "--in", str(world["dir"]),
                 "--out", str(scores), "--device", "cpu"]) == 0
    sm = json.loads((scores / "manifest.json").read_text())
    assert sm["calibration"]["threshold"] == json.loads((fdir / "calibration.json").read_text())["threshold"]
    out = tmp_path / "kept"
    assert main(["curate", "filter", "--in", str(world["dir"]), "--out", str(out), "--scores", f"dfn={scores}",
                 "--keep", "dfn>=calibrated", "--ground-truth", str(world["dir"] / "faults.jsonl")]) == 0
    fm = json.loads((out / "manifest.json").read_text())
    assert fm["counts"]["reconciled"]
    gt = fm["ground_truth"]
    assert {"mismatch_recall", "clean_kept_frac", "precision"} <= set(gt)
    assert fm["thresholds"]["dfn>=calibrated"] == sm["calibration"]["threshold"]


def test_score_resume_skips_finished_shards(tmp_path, world, tiny_tokenizer_dir, monkeypatch):
    from vlmforge.curate.scorers.clip import ContrastiveScorer

    mdir = tiny_contrastive("clip", tiny_tokenizer_dir, tmp_path / "m")
    args = ["curate", "score", "--scorer", "clip", "--model", str(mdir), "--in", str(world["dir"]),
            "--out", str(tmp_path / "s"), "--batch-size", "4", "--device", "cpu"]
    real = ContrastiveScorer.score
    seen = {"n": 0}

    def dying(self, batch):
        seen["n"] += 1
        if seen["n"] == 4:  # shard 0 (10 samples = 3 batches) is done, killed inside shard 1
            raise KeyboardInterrupt("simulated kill")
        return real(self, batch)

    monkeypatch.setattr(ContrastiveScorer, "score", dying)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert sorted(p.name for p in (tmp_path / "s").glob("*.parquet")) == ["00000.parquet"]
    before = (tmp_path / "s" / "00000.parquet").stat().st_mtime_ns
    monkeypatch.setattr(ContrastiveScorer, "score", real)
    assert main(args) == 0
    assert (tmp_path / "s" / "00000.parquet").stat().st_mtime_ns == before  # not redone
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["counts"]["in"] == world["n"] and m["counts"]["reconciled"]


# -- MLM judge -----------------------------------------------------------------------------
def test_parse_score():
    from vlmforge.curate.scorers.mlm import parse_score

    assert parse_score("85") == 85.0
    assert parse_score("Score: 100.") == 100.0
    assert parse_score("I would rate it 7 out of 100") == 7.0
    assert parse_score("3.5") is None  # not an integer score
    assert parse_score("250 then 40") == 40.0
    assert parse_score("no idea") is None
    assert parse_score("") is None


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("vlm"))


def test_mlm_expected_value_matches_reference(tiny_vlm):
    from PIL import Image

    from vlmforge.curate.scorers.mlm import (
        candidate_ids,
        expected_scores,
        expected_scores_reference,
        judge_messages,
    )
    from vlmforge.images import preprocess_batch
    from vlmforge.model.decoding import prompt_ids

    _, model, tok = tiny_vlm
    pv = preprocess_batch([Image.new("RGB", (20, 20), (200, 0, 0))], model.preprocess_spec())
    ids = prompt_ids(model, tok, judge_messages("a red circle", "image_text_matching"), 1)
    cands = candidate_ids(tok)
    assert len(cands) == 101 and all(c[-1] == tok.convert_tokens_to_ids("<|im_end|>") for c in cands)
    sub = [cands[i] for i in (0, 5, 9, 10, 42, 99, 100)]  # 1-, 2- and 3-digit answers
    ev, mass = expected_scores(model, ids, pv, sub)
    ev_ref, mass_ref = expected_scores_reference(model, ids, pv, sub)
    assert ev == pytest.approx(ev_ref, abs=1e-4) and mass == pytest.approx(mass_ref, rel=1e-3)
    assert 0.0 <= ev <= len(sub) - 1


def test_mlm_scorer_records_unparseable(tmp_path, tiny_vlm, monkeypatch):
    import vlmforge.model.decoding as gen

    ckpt, _, _ = tiny_vlm
    world = make_world(tmp_path / "w", n=3, per_shard=3, n_mismatch=0, n_exact=0, n_near=0, n_corrupt=0)
    answers = iter(["85", "no idea", "Score: 40"])
    monkeypatch.setattr(gen, "generate", lambda m, t, prompts, images, **k: [next(answers) for _ in prompts])
    out = tmp_path / "s"
    assert main(["curate", "score", "--scorer", "mlm", "--model", str(ckpt), "--in", str(world["dir"]),
                 "--out", str(out), "--device", "cpu", "--set", "curate.score.mlm_metrics=[image_text_matching]"]) == 0
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["image_text_matching_parsed"] for r in rows] == [85.0, None, 40.0]
    assert [r["unparseable"] for r in rows] == ["", "image_text_matching", ""]
    assert [r["image_text_matching_answer"] for r in rows] == ["85", "no idea", "Score: 40"]
    for r in rows:
        assert 0 <= r["image_text_matching_ev"] <= 100 and r["score"] == pytest.approx(r["image_text_matching_ev"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["judge_answers_unparseable"] == 1 and m["counts"]["reconciled"]


def test_dedup_by_embeddings(tmp_path, world, tiny_tokenizer_dir):
    from vlmforge.curate.dedup import embedding_pairs

    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    x[7] = x[3] + 0.01
    x[20] = x[3] * 2  # same direction: cosine 1
    got = {(a, b) for a, b, _ in embedding_pairs(x, 0.99, block=7)}
    n = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert got == {(a, b) for a in range(30) for b in range(a + 1, 30) if n[a] @ n[b] >= 0.99} == {(3, 7), (3, 20), (7, 20)}

    mdir = tiny_contrastive("clip", tiny_tokenizer_dir, tmp_path / "m")
    scores = tmp_path / "s"
    assert main(["curate", "score", "--scorer", "clip", "--model", str(mdir), "--in", str(world["dir"]),
                 "--out", str(scores), "--device", "cpu", "--set", "curate.score.save_embeddings=true"]) == 0
    row = pq.read_table(scores / "00000.parquet").to_pylist()[0]
    assert len(row["image_embedding"]) == 16
    out = tmp_path / "d"
    assert main(["curate", "dedup", "--in", str(world["dir"]), "--out", str(out), "--near", "embedding",
                 "--embeddings", str(scores), "--min-cosine", "0.9999"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["reconciled"] and "near_embedding" in m["duplicates"]
    assert m["dropped"]["exact_duplicate_image"] == 1
