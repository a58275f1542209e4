"""Random JPEG quality in SFT (InternVL's augmentation): a pure function of (seed, epoch, record,
image), drawn from 75..100, PIL's encoder; off gives exactly the batches of before; batches stay
exact across workers, ranks, resume and a killed training run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_train import one_torch_thread
from PIL import Image

from vlmforge.config.sft import SFTDataConfig
from vlmforge.data.sft.augment import JPEG_QUALITY_MAX, JPEG_QUALITY_MIN, jpeg_quality, jpeg_reencode
from vlmforge.data.sft.build import build_index
from vlmforge.data.sft.loader import SFTLoader
from vlmforge.data.sft.samples import SFTDataset
from vlmforge.files import read_metrics
from vlmforge.images import preprocess_batch
from vlmforge.text.tokenization import load_tokenizer
from vlmforge.train.loop import KILL_ENV

VT = 4
SPEC = dict(size=16, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], rescale=1 / 255)
BATCH = 2

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


def write_world(root: Path, n: int = 16, size: int = 24) -> Path:
    """``root/img/<k>.png`` (noise, so every JPEG quality changes pixels) and ``root/data.jsonl``."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "img" / f"{k}.png")
    rows = []
    for i in range(n):
        turns = [{"from": "human", "value": "<image>\nWhat colour is the square?"},
                 {"from": "gpt", "value": f"The square is {['red', 'blue', 'green'][i % 3]}."}]
        rows.append({"id": f"r{i}", "image": f"img/{i % 6}.png", "conversations": turns})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_dir):
    root = write_world(tmp_path_factory.mktemp("jpeg"))
    build_index([root / "data.jsonl"], root / "idx", visual_tokens=VT, image_root=root, tokenizer=tiny_tokenizer_dir,
                progress=False)
    return root


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _cfg(**kw):
    c = SFTDataConfig(max_len=64, pack_window=50)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _arrays(images):
    return [np.asarray(im) for im in images]


# ----------------------------------------------------------------------------- the draw and the encoder


def test_quality_is_a_pure_uniform_draw_from_75_to_100():
    draws = [jpeg_quality(0, e, i, k) for e in range(4) for i in range(200) for k in range(3)]
    assert draws == [jpeg_quality(0, e, i, k) for e in range(4) for i in range(200) for k in range(3)]
    assert min(draws) == JPEG_QUALITY_MIN == 75 and max(draws) == JPEG_QUALITY_MAX == 100
    counts = np.bincount(np.array(draws) - 75, minlength=26)
    assert counts.size == 26 and counts.min() > 0  # every quality, both ends included
    assert counts.max() < 3 * counts.mean()  # uniform, roughly (2400 draws over 26 values)
    # another epoch, record, image or seed draws again
    assert sum(jpeg_quality(0, 0, i, 0) != jpeg_quality(0, 1, i, 0) for i in range(100)) > 80
    assert sum(jpeg_quality(0, 0, i, 0) != jpeg_quality(1, 0, i, 0) for i in range(100)) > 80
    assert sum(jpeg_quality(0, 0, i, 0) != jpeg_quality(0, 0, i, 1) for i in range(100)) > 80


def test_reencode_is_pils_jpeg_at_that_quality(world):
    im = Image.open(world / "img" / "0.png").convert("RGB")
    for q in (75, 90, 100):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=q)
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        out = jpeg_reencode(im, q)
        assert out.mode == "RGB" and out.size == im.size and np.array_equal(np.asarray(out), ref)
        assert not np.array_equal(np.asarray(out), np.asarray(im))
    assert not np.array_equal(np.asarray(jpeg_reencode(im, 75)), np.asarray(jpeg_reencode(im, 100)))


# ----------------------------------------------------------------------------- samples


def test_same_seed_epoch_record_same_pixels_other_epochs_differ(world, tok):
    ds = SFTDataset(world / "idx", tok, image_spec=SPEC, jpeg_augment=True)
    for i in range(len(ds)):
        plain = ds.decoded(i)[2]
        a, b = ds.decoded(i, augment=(7, 0))[2], ds.decoded(i, augment=(7, 0))[2]
        assert all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b)))
        # exactly the drawn quality's JPEG of the decoded image, not the un-augmented pixels
        want = jpeg_reencode(plain[0], jpeg_quality(7, 0, i, 0))
        assert np.array_equal(np.asarray(a[0]), np.asarray(want))
        assert not np.array_equal(np.asarray(a[0]), np.asarray(plain[0]))
        other = ds.decoded(i, augment=(7, 1))[2]
        same_q = jpeg_quality(7, 0, i, 0) == jpeg_quality(7, 1, i, 0)
        assert np.array_equal(np.asarray(other[0]), np.asarray(a[0])) == same_q
    # the default path (what anything but a training batch reads) is never augmented
    assert np.array_equal(ds[0]["pixel_values"], preprocess_batch(ds.decoded(0)[2], SPEC))


def test_off_is_exactly_the_batches_of_before(world, tok):
    """jpeg_augment off: a batch's pixels are the plain preprocessing of the decoded images."""
    ds = SFTDataset(world / "idx", tok, image_spec=SPEC)
    assert not ds.augments(0)
    loader = SFTLoader(ds, _cfg(drop_last=False), batch_size=BATCH, seed=1, rank=0, world_size=1)
    plan = loader.plan(0)
    records, row_starts, batch_starts = plan
    for j in range(len(batch_starts) - 1):
        got = loader.build_batch(plan, j)["batch"]
        recs = records[row_starts[batch_starts[j]]:row_starts[batch_starts[j + 1]]]
        want = torch.cat([ds[int(i)]["pixel_values"] for i in recs])
        assert torch.equal(got["pixel_values"], want)


# ----------------------------------------------------------------------------- batches


def _take(loader, n):
    it = loader.forever()
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["pixel_values"], y["pixel_values"])
               for x, y in zip(a, b))


def test_augmented_batches_are_exact_across_resume_ranks_and_workers(world, tok):
    ds = SFTDataset(world / "idx", tok, image_spec=SPEC, jpeg_augment=True)
    plain = SFTDataset(world / "idx", tok, image_spec=SPEC)

    def loader(data=ds, **kw):
        rank, world_size = kw.pop("rank", 0), kw.pop("world_size", 1)
        return SFTLoader(data, _cfg(**kw), batch_size=BATCH, seed=5, rank=rank, world_size=world_size)

    n = loader().batches_per_epoch(0)
    ref = _take(loader(), 2 * n + 1)  # three epochs
    assert _same(ref, _take(loader(), 2 * n + 1))
    unaug = _take(loader(plain), 2 * n + 1)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(ref, unaug))  # same plan
    assert not any(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(ref, unaug))
    # kill and resume: a JSON round trip of the state mid-epoch 1
    first = loader()
    it = first.forever()
    for _ in range(n + 1):
        next(it)
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert _same(ref[n + 1:], _take(resumed, n))
    # DataLoader workers (uint8 pixels normalised in this process) give the same batches
    assert _same(ref, _take(loader(num_workers=2), 2 * n + 1))
    # 2 ranks take the 1-rank batches round-robin, with the same pixels
    one = list(loader())
    r0, r1 = list(loader(rank=0, world_size=2)), list(loader(rank=1, world_size=2))
    assert _same(r0, one[0::2]) and _same(r1, one[1::2])
    # the same plan and batch in another epoch: same tokens, new qualities
    lo = loader()
    plan = lo.plan(0)
    e0, e1 = lo.build_batch(plan, 0, epoch=0)["batch"], lo.build_batch(plan, 0, epoch=1)["batch"]
    assert torch.equal(e0["input_ids"], e1["input_ids"]) and not torch.equal(e0["pixel_values"], e1["pixel_values"])


# ----------------------------------------------------------------------------- a killed training run

FAST = ["train.progress_bar=false", "train.tensorboard=false", "train.report=false", "train.micro_batch_size=1",
        "train.global_batch_size=1", "train.max_steps=7", "train.checkpoint_every=2", "train.keep_last=5",
        "train.init_from=null", "sft.max_len=160", "sft.index_workers=1"]


def _train_args(index, run, tok_dir, extra=()):
    sets = [f"sft.index={index}", f"train.run_dir={run}", f"tokenizer.path={tok_dir}", *FAST, *extra]
    return ["train", "--recipe", "tiny/sft", *[a for s in sets for a in ("--set", s)]]


def test_killed_sft_run_with_jpeg_augmentation_resumes_bit_identically(tmp_path, tiny_tokenizer_dir, capsys):
    """3 records, one per row and step: killed after step 5 (checkpoint at 4, in epoch 1), resumed
    through the start of epoch 2."""
    from vlmforge.cli import main

    root = write_world(tmp_path / "w", n=3, size=64)
    assert main(["sft-index", "--recipe", "tiny/sft", "--input", str(root / "data.jsonl"), "--out",
                 str(root / "idx"), "--image-root", str(root), "--tokenizer", tiny_tokenizer_dir]) == 0
    on = ["sft.jpeg_augment=true"]
    env = dict(os.environ, **{KILL_ENV: "5", "OMP_NUM_THREADS": "1"})
    killed = subprocess.run([sys.executable, "-m", "vlmforge", *_train_args(root / "idx", tmp_path / "run",
                                                                            tiny_tokenizer_dir, on)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]
    capsys.readouterr()
    assert main(_train_args(root / "idx", tmp_path / "run", tiny_tokenizer_dir, on)) == 0
    assert "step_00000004" in capsys.readouterr().out  # resumed from the checkpoint at step 4
    assert main(_train_args(root / "idx", tmp_path / "ref", tiny_tokenizer_dir, on)) == 0
    assert main(_train_args(root / "idx", tmp_path / "off", tiny_tokenizer_dir)) == 0
    rows = {name: [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / name)]
            for name in ("run", "ref", "off")}
    assert [s for s, _, _ in rows["ref"]] == [1, 2, 3, 4, 5, 6, 7]
    assert rows["run"] == rows["ref"]  # bit for bit, across the epoch boundary
    assert rows["off"] != rows["ref"]  # the augmentation reached the model
    assert json.loads((tmp_path / "ref" / "run.json").read_text())["settings"]["sft.jpeg_augment"] is True
