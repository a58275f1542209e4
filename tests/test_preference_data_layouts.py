"""Preference batches: the shared-prompt and duplicated layouts give the same per-pair log-prob sums
as scoring each [prompt + response] alone, each image is encoded once per pair, and the loader
resumes exactly and splits pairs over ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_model import tiny_model
from fixtures_train import one_torch_thread
from PIL import Image

from vlmforge.arch.geometry import image_preprocess_spec, visual_tokens_per_image
from vlmforge.config import load_recipe
from vlmforge.data.preference.build import build_preference_index
from vlmforge.data.preference.formats import PreferenceDataError
from vlmforge.data.preference.loader import build_preference_loader
from vlmforge.errors import ConfigError
from vlmforge.model.tower import inner
from vlmforge.text.tokenization import load_tokenizer
from vlmforge.train.mpo import pair_logps

MODEL = ["model.projector.pool_size=2"]  # 4 visual tokens per image: short rows
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40), (160, 40, 200), (240, 140, 30)]
ANSWERS = ["A small red circle at the left.", "There are 3 shapes.", "The star is blue.", "Yes.", "No.",
           "A large green square at the top, next to a yellow triangle."]
N_PAIRS = 11

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


def _rows(img: Path) -> list[dict]:
    rows = []
    for i in range(N_PAIRS):
        n_img = [1, 2, 0][i % 3]
        names = [f"p{i}_{k}.png" for k in range(n_img)]
        for k, name in enumerate(names):
            Image.new("RGB", (24, 24), COLOURS[(i + 2 * k) % len(COLOURS)]).save(img / name)
        rows.append({"image": names, "question": ["What is in the picture?", "How many shapes are there?",
                                                  "Describe the image. Answer with one word."][i % 3],
                     "chosen": ANSWERS[i % 6] + " Yes." * (i % 4) + " ".join(ANSWERS * 2) * (i == N_PAIRS - 1),
                     "rejected": ANSWERS[(i + 1) % 6]})  # the last pair is long: the others pack in its width
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("pref")
    (d / "img").mkdir()
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(d / "img")))
    vt = visual_tokens_per_image(load_recipe(None, MODEL).model)
    build_preference_index([d / "pairs.jsonl"], d / "idx", tokenizer=tiny_tokenizer_dir, visual_tokens=vt,
                           max_len=512, image_root=d / "img", progress=False)
    return d


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _loader(tok, idx, layout="shared", *, batch_size=4, rank=0, world=1, seed=0, overrides=()):
    cfg = load_recipe(None, MODEL + [f"preference.index={idx}", "preference.max_len=200", *overrides])
    return build_preference_loader(cfg, tok, batch_size=batch_size, seed=seed, rank=rank, world_size=world,
                                   visual_tokens=visual_tokens_per_image(cfg.model),
                                   image_spec=image_preprocess_spec(cfg.model), layout=layout)


def _pair_sums(model, batch) -> dict[int, tuple[float, float]]:
    extra = {k: batch[k] for k in ("pixel_values", "position_ids", "seq_ids", "branch_ids", "image_map") if k in batch}
    with torch.no_grad():
        lp = model(batch["input_ids"], output="target_logprobs", pred_index=batch["pred_index"],
                   target_ids=batch["target_ids"], **extra)
    sums, _ = pair_logps(lp, batch["target_pair"], batch["target_side"], int(batch["pair_ids"].numel()))
    chosen, rejected = sums[:, 0], sums[:, 1]
    return {int(p): (float(c), float(r)) for p, c, r in zip(batch["pair_ids"], chosen, rejected)}


def _alone(model, sample) -> tuple[float, float]:
    """Each [prompt + response] scored as its own row, from the full logits."""
    out = []
    for resp in (sample.chosen, sample.rejected):
        ids = torch.from_numpy(np.concatenate([sample.prompt, resp]))[None]
        with torch.no_grad():
            logits = model(ids, sample.pixel_values, seq_ids=torch.zeros_like(ids))
        p = sample.prompt.size
        logp = torch.log_softmax(logits[0, p - 1 : ids.shape[1] - 1].float(), -1)
        out.append(float(logp.gather(-1, torch.from_numpy(resp)[:, None]).double().sum()))
    return out[0], out[1]


@pytest.mark.parametrize("attention", ["document", "causal"])
def test_shared_and_duplicated_log_probs_equal_scoring_each_response_alone(data, tok, attention):
    model = tiny_model(tok, *MODEL, f"model.attention={attention}", seed=1, spread=0.2)
    over = [f"model.attention={attention}"]
    shared, dup = (_loader(tok, data / "idx", layout, overrides=over) for layout in ("shared", "duplicated"))
    (sb,) = shared.reference_batches(N_PAIRS)
    (db,) = dup.reference_batches(N_PAIRS)
    assert sorted(sb["pair_ids"].tolist()) == sorted(db["pair_ids"].tolist()) == list(range(N_PAIRS))
    rows = sb["input_ids"].shape[0]
    # the branch mask keeps packed pairs apart in either attention mode, so pairs share rows
    assert rows < N_PAIRS
    assert db["input_ids"].shape[0] == 2 * N_PAIRS and "branch_ids" not in db
    got_s, got_d = _pair_sums(model, sb), _pair_sums(model, db)
    for i in range(N_PAIRS):
        ref = _alone(model, shared.samples[i])
        for got in (got_s[i], got_d[i]):
            assert got == pytest.approx(ref, abs=1e-5, rel=0), (i, got, ref)


def test_shared_layout_rows_positions_and_targets(data, tok):
    loader = _loader(tok, data / "idx", "shared", overrides=["model.attention=document"])
    b = next(iter(loader.reference_batches(3)))  # pairs 0, 1, 2: 1 image, 2 images, text-only
    width = b["input_ids"].shape[1]
    for k, pid in enumerate(b["pair_ids"].tolist()):
        s = loader.samples[pid]
        p, c = s.prompt.size, s.chosen.size
        chosen = (b["target_pair"] == k) & (b["target_side"] == 0)
        rejected = (b["target_pair"] == k) & (b["target_side"] == 1)
        assert b["target_ids"][chosen].tolist() == s.chosen.tolist()
        assert b["target_ids"][rejected].tolist() == s.rejected.tolist()
        first_c, first_r = b["pred_index"][chosen][0], b["pred_index"][rejected][0]
        assert first_c == first_r  # both responses are predicted from the prompt's last position
        r, col = divmod(int(first_c), width)
        assert b["branch_ids"][r, col] == 0 and b["branch_ids"][r, col + 1] == 1
        start = col + 1 - p
        assert b["input_ids"][r, start : start + p].tolist() == s.prompt.tolist()
        pos = b["position_ids"][r]
        assert pos[start + p : start + p + c].tolist() == list(range(p, p + c))
        assert pos[start + p + c : start + p + c + s.rejected.size].tolist() == list(range(p, p + s.rejected.size))
    n_img = sum(int(loader.samples.index.n_images[p]) for p in b["pair_ids"].tolist())
    assert b["pixel_values"].shape[0] == n_img == 3 and "image_map" not in b


def test_the_vision_tower_runs_once_per_pair_image_in_both_layouts(data, tok):
    model = tiny_model(tok, *MODEL, "model.attention=document", seed=0)
    seen = []
    hook = inner(model.vision).embeddings.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    try:
        for layout in ("shared", "duplicated"):
            seen.clear()
            loader = _loader(tok, data / "idx", layout, overrides=["model.attention=document"])
            n_images = 0
            for batch in loader.reference_batches(4):
                n_images += sum(int(loader.samples.index.n_images[p]) for p in batch["pair_ids"].tolist())
                _pair_sums(model, batch)
            assert sum(seen) == n_images == 12  # each pair's images once, not once per response
            if layout == "duplicated":
                assert batch["image_map"].numel() == 2 * batch["pixel_values"].shape[0]
    finally:
        hook.remove()


def _ids(batches) -> list[list[int]]:
    return [b["pair_ids"].tolist() for b in batches]


def test_loader_resumes_exactly_and_does_not_depend_on_workers(data, tok):
    full = _ids(_loader(tok, data / "idx", batch_size=3))
    again = _loader(tok, data / "idx", batch_size=3)
    assert again.batches_per_epoch(0) == len(full) == 4 and again.num_pairs == N_PAIRS
    assert sorted(p for b in full for p in b) == list(range(N_PAIRS))
    it = iter(again)
    first = [next(it)["pair_ids"].tolist() for _ in range(2)]
    state = json.loads(json.dumps(again.state_dict()))
    resumed = _loader(tok, data / "idx", batch_size=3)
    resumed.load_state_dict(state)
    assert first + _ids(resumed) == full
    assert resumed.epoch == 1 and _ids(resumed) != full  # the next epoch: another order
    workers = _loader(tok, data / "idx", batch_size=3, overrides=["preference.num_workers=2"])
    assert [b["pair_ids"].tolist() for b in workers] == full
    with pytest.raises(PreferenceDataError, match="batch_size=3 but this run has 4"):
        _loader(tok, data / "idx", batch_size=4).load_state_dict(state)


def test_two_ranks_split_the_pairs_and_reference_batches_cover_each_once(data, tok):
    ranks = [_loader(tok, data / "idx", "duplicated", batch_size=2, rank=r, world=2) for r in (0, 1)]
    ref = [[p for b in loader.reference_batches(2) for p in b["pair_ids"].tolist()] for loader in ranks]
    assert ref[0] == list(range(0, N_PAIRS, 2)) and ref[1] == list(range(1, N_PAIRS, 2))
    assert ranks[0].reference_batch_count(2) == 3
    train = [[p for b in loader for p in b["pair_ids"].tolist()] for loader in ranks]
    # 6 micro-batches (the last of 1 pair), 3 per rank, every pair on one rank
    assert ranks[0].batches_per_epoch(0) == ranks[1].batches_per_epoch(0) == 3
    assert not set(train[0]) & set(train[1]) and sorted(train[0] + train[1]) == list(range(N_PAIRS))


def test_a_vanished_image_is_skipped_and_counted(data, tok, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(data, d)
    idx = d / "idx"
    man = json.loads((idx / "manifest.json").read_text())
    for s in man["sources"]:  # point the copy's index at the copied rows and images
        s["path"], s["image_root"] = str(d / "pairs.jsonl"), str(d / "img")
    (idx / "manifest.json").write_text(json.dumps(man))
    (d / "img" / "p3_0.png").unlink()
    loader = _loader(tok, idx, batch_size=4)
    seen = [p for b in loader.reference_batches(4) for p in b["pair_ids"].tolist()]
    assert 3 not in seen and len(seen) == N_PAIRS - 1 and loader.reference_skipped == {"missing_image": 1}
    assert sum(len(b) for b in _ids(loader)) == N_PAIRS - 1 and loader.skipped == {"missing_image": 1}
    strict = _loader(tok, idx, batch_size=N_PAIRS, overrides=["preference.strict=true"])
    with pytest.raises(PreferenceDataError, match=r"pairs.jsonl:4: image file not found"):
        list(strict)


def test_pairs_longer_than_max_len_are_left_out_and_counted(data, tok):
    loader = _loader(tok, data / "idx", overrides=["preference.max_len=40"])
    longest = loader.samples.index.longest_row(loader.samples.visual_tokens)
    assert loader.skipped["prompt_too_long"] == int((longest > 40).sum()) > 0
    assert loader.num_pairs == N_PAIRS - loader.skipped["prompt_too_long"]


def test_shared_layout_needs_restart_positions(data, tok):
    with pytest.raises(ConfigError, match="model.positions=restart"):
        _loader(tok, data / "idx", "shared", overrides=["model.positions=v2pe"])
    assert _loader(tok, data / "idx", "duplicated", overrides=["model.positions=v2pe"]).num_pairs == N_PAIRS


def test_shared_rows_pack_short_pairs_within_the_longest_pairs_width():
    from vlmforge.data.preference.layouts import PairSample, shared_batch, shared_rows

    def pair(i, n):  # prompt n - 4, responses 2 + 2
        return PairSample(i, np.arange(n - 4) + 10, np.array([5, 6]), np.array([7, 8]))

    samples = [pair(0, 40), pair(1, 10), pair(2, 12), pair(3, 18), pair(4, 60)]
    rows = shared_rows(samples, max_len=50)
    assert sorted(k for row in rows for k in row) == list(range(5))
    assert [4] in rows  # longer than max_len: a row of its own
    assert all(sum(samples[k].shared_length for k in row) <= 50 for row in rows if row != [4])
    assert len(rows) == 3  # 40 + 10, 12 + 18, 60
    b = shared_batch(samples, pad_id=0, max_len=50)
    assert b["input_ids"].shape == (3, 60) and sorted(b["pair_ids"].tolist()) == list(range(5))
    assert shared_rows(samples, max_len=50, pack_pairs=False) == [[k] for k in range(5)]
