"""Bin packing (plan_packs) and the pack collator."""

import numpy as np
import pytest
import torch

from vlmforge.data.collate import IGNORE_INDEX, collate_packs
from vlmforge.data.packer import fill_stats, first_fit_decreasing, lower_bound, plan_packs
from vlmforge.data.pretrain.loader import caption_sample, text_sample


def caption_lengths(n, seed=0):
    """The Open-Qwen2VL caption distribution: 144 visual + lognormal(median 20, sigma .6) in [5, 300] + 1."""
    rng = np.random.default_rng(seed)
    return 144 + np.clip(np.round(rng.lognormal(np.log(20), 0.6, n)), 5, 300).astype(np.int64) + 1


def assert_valid(lengths, packs, max_len):
    idx = np.sort(np.concatenate(packs)) if packs else np.array([], np.int64)
    np.testing.assert_array_equal(idx, np.arange(len(lengths)))  # every sample exactly once
    assert all(int(lengths[p].sum()) <= max_len for p in packs)


@pytest.mark.parametrize("method", ["auto", "exact", "ffd"])
def test_every_sample_once_and_no_overflow_fuzz(method):
    rng = np.random.default_rng(1)
    for trial in range(150):
        max_len = int(rng.integers(1, 300))
        lengths = rng.integers(1, max_len + 1, int(rng.integers(0, 120)))
        assert_valid(lengths, plan_packs(lengths, max_len, seed=trial, method=method), max_len)


def test_caption_distribution_reaches_target_fill():
    lengths = caption_lengths(10_000)
    packs = plan_packs(lengths, 4096)
    assert_valid(lengths, packs, 4096)
    ours, ffd = fill_stats(lengths, packs, 4096), fill_stats(lengths, first_fit_decreasing(lengths, 4096), 4096)
    assert ours["mean_fill"] >= 0.995
    assert ours["packs"] <= lower_bound(lengths, 4096) + 2
    assert ffd["packs"] > ours["packs"]


def test_wide_distribution_never_worse_than_ffd_by_much():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 4097, 2000)
    packs = plan_packs(lengths, 4096)
    assert_valid(lengths, packs, 4096)
    assert len(packs) <= len(first_fit_decreasing(lengths, 4096))


def test_deterministic_and_rejects_bad_lengths():
    lengths = caption_lengths(3000, seed=3)
    a, b = plan_packs(lengths, 4096, seed=5), plan_packs(lengths, 4096, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="outside"):
        plan_packs(np.array([10, 5000]), 4096)
    with pytest.raises(ValueError, match="outside"):
        plan_packs(np.array([0, 5]), 4096)
    assert plan_packs(np.array([], np.int64), 16) == []


def test_collate_hand_worked():
    img = torch.ones(1, 3, 4, 4)
    a = caption_sample([11, 12], image_token_id=7, num_visual_tokens=3, sep_id=2, pixel_values=img)
    b = text_sample([21, 22, 23], sep_id=2)
    c = caption_sample([31], image_token_id=7, num_visual_tokens=3, sep_id=2, supervise_sep=False,
                       pixel_values=2 * img)
    batch = collate_packs([[a, b], [c]], pad_id=0)
    P = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [
        [7, 7, 7, 11, 12, 2, 21, 22, 23, 2],
        [7, 7, 7, 31, 2, 0, 0, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [P, P, P, 11, 12, 2, P, 22, 23, 2],
        [P, P, P, 31, P, P, P, P, P, P],
    ]
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
        [0, 1, 2, 3, 4, 0, 0, 0, 0, 0],
    ]
    assert batch["seq_ids"].tolist() == [
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, -1, -1, -1, -1, -1],
    ]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["pixel_values"][1].max() == 2  # order of appearance
    cont = collate_packs([[a, b]], pad_id=0, pad_to=12, positions="continue")
    assert cont["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0]]
    assert "pixel_values" in cont and cont["input_ids"].shape == (1, 12)
    with pytest.raises(ValueError, match="pad_to"):
        collate_packs([[a, b]], pad_id=0, pad_to=5)
    assert "pixel_values" not in collate_packs([[b]], pad_id=0)
