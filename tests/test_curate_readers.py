"""curate score's readers: vlmforge's pixels == transformers' processor's (bit for bit), scores with
reader workers == scores without (exact), bad images still skipped and counted, draft decoding opt-in."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_curate import draw, jpeg, make_world, tiny_contrastive
from PIL import Image

from vlmforge.arch.geometry import build_image_processor
from vlmforge.curate.io import decode_scaled
from vlmforge.curate.score import score_shards
from vlmforge.curate.scorers.clip import ContrastiveScorer
from vlmforge.curate.scorers.clip_pixels import pixel_steps, processor_pixels
from vlmforge.errors import UserError
from vlmforge.imagedecode import ImageDecodeError, decode_image
from vlmforge.shards import ShardWriter, list_shards


def photo(i: int, w: int, h: int) -> Image.Image:
    """Smooth colour waves + noise: a JPEG that decodes to many distinct values."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(x / rng.uniform(8, 30) + c) * np.cos(y / rng.uniform(8, 30) - c) for c in range(3)], -1)
    return Image.fromarray((127 + 100 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The hand-made caption world (one damaged image) plus a shard of larger photos (draft scales them)."""
    w = make_world(tmp_path_factory.mktemp("readers") / "world", n=21, per_shard=8, n_mismatch=2,
                   n_exact=1, n_near=1, n_corrupt=1)
    with ShardWriter(w["dir"], samples_per_shard=100, start_index=10, timestamps=False) as sw:
        for i, (pw, ph) in enumerate([(160, 120), (90, 200), (128, 128), (300, 70), (41, 33), (200, 150)]):
            sw.write(sw.next_key(), jpeg(photo(i, pw, ph)), f"a red circle {i}", {"uid": f"{1000 + i:032x}"})
        sw.write(sw.next_key(), jpeg(photo(9, 64, 64))[:400], "truncated", {"uid": f"{2000:032x}"})
    return w


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return tiny_contrastive("clip", tiny_tokenizer_dir, tmp_path_factory.mktemp("clip"))


def sample_images() -> list[Image.Image]:
    """Decoded JPEGs of many shapes: landscape, portrait, square, tiny, odd sizes, flat colours."""
    sizes = [(160, 120), (90, 200), (128, 128), (300, 70), (41, 33), (7, 5), (33, 41), (224, 224), (513, 257)]
    ims = [decode_image(jpeg(photo(i, w, h))) for i, (w, h) in enumerate(sizes)]
    return ims + [decode_image(jpeg(draw("blue", "square", size=48, layout=3)))]


@pytest.mark.parametrize("arch,size", [("clip", 32), ("clip", 64), ("clip", 224), ("siglip", 32), ("siglip", 384)])
def test_pixels_equal_the_processor(arch, size):
    proc = build_image_processor(arch, size)
    steps = processor_pixels(proc)
    assert steps is not None
    for im in sample_images():
        want = proc(images=[im], return_tensors="pt")["pixel_values"]
        got = steps.batch([im])
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)  # bit-identical, so within any tolerance (1e-6 asked)
    ims = sample_images()
    assert torch.equal(steps.batch(ims), proc(images=ims, return_tensors="pt")["pixel_values"])


def test_unreproduced_processors_fall_back():
    proc = build_image_processor("clip", 32)
    proc.do_pad = True
    assert pixel_steps(proc) is None
    proc = build_image_processor("clip", 32)
    proc.do_center_crop = False  # shortest-edge resize without the crop: images of a batch differ in size
    assert pixel_steps(proc) is None

    class Shifted:
        """Says it does the plain steps, gives other values: the load-time check must notice."""

        def __init__(self):
            self.inner = build_image_processor("siglip", 32)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, **kw):
            out = self.inner(**kw)
            return {"pixel_values": out["pixel_values"] + 1e-6}

    assert pixel_steps(Shifted()) is not None and processor_pixels(Shifted()) is None


def no_address(text):
    """PIL's "cannot identify image file <_io.BytesIO object at 0x...>" names an address that differs per run."""
    return None if text is None else re.sub(r" at 0x[0-9a-f]+", "", text)


def scores(out: Path) -> list[dict]:
    rows = [r for f in sorted(out.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return [{**r, "error": no_address(r["error"])} for r in rows]


def test_scores_with_workers_equal_scores_without(tmp_path, world, model_dir, monkeypatch):
    from vlmforge.data.pixels import PixelSlots

    released = []
    real_release = PixelSlots.release
    monkeypatch.setattr(PixelSlots, "release", lambda self, slot, px: (released.append(slot), real_release(self, slot, px)))
    shards = list_shards(world["dir"])
    fast = ContrastiveScorer(str(model_dir), device="cpu", save_embeddings=True)
    slow = ContrastiveScorer(str(model_dir), device="cpu", save_embeddings=True, pixels="processor")
    assert fast.pixels is not None and slow.pixels is None
    runs = {}
    for name, scorer, workers in [("processor_w0", slow, 0), ("processor_w2", slow, 2), ("w0", fast, 0), ("w1", fast, 1),
                                   ("w2", fast, 2)]:
        m = score_shards(shards, tmp_path / name, scorer, batch_size=3, num_workers=workers)
        runs[name] = (m, scores(tmp_path / name))
    assert released and min(released) >= 0  # the workers' pixels came through their reused buffers
    assert len(set(released)) < len(released)
    m0, rows0 = runs["w0"]
    assert len(rows0) == world["n"] + 7
    for name, (m, rows) in runs.items():
        assert rows == rows0, name  # every column, exactly: scores, embeddings, errors, order
        assert m["counts"] == m0["counts"] and m["dropped"] == m0["dropped"], name


def test_bad_images_are_skipped_and_counted(tmp_path, world, model_dir):
    shards = list_shards(world["dir"])
    for workers, draft in [(0, False), (2, False), (2, True)]:
        scorer = ContrastiveScorer(str(model_dir), device="cpu", draft=draft)
        out = tmp_path / f"w{workers}_{draft}"
        m = score_shards(shards, out, scorer, batch_size=4, num_workers=workers)
        assert m["counts"] == {"in": world["n"] + 7, "scored": world["n"] - 1 + 6, "not_scored": 2,
                               "reconciled": True}
        assert m["dropped"] == {"corrupt": 2}
        bad = {r["key"]: r["error"] for r in scores(out) if r["error"]}
        assert len(bad) == 2 and all(e.startswith("image: cannot decode image") for e in bad.values()), bad
        assert all(r["score"] is None for r in scores(out) if r["error"])


def test_decode_scaled_keeps_decode_image_for_everything_but_a_jpeg_scale():
    big = jpeg(photo(1, 200, 150))
    im = decode_scaled(big, (32, 32))
    assert im.mode == "RGB" and im.size == (50, 38)  # 1/4: the smallest scale with both sides >= 32
    assert decode_scaled(big, (64, 64)).size == (100, 75)
    assert decode_scaled(big, None).tobytes() == decode_image(big).tobytes()
    assert decode_scaled(big, (300, 300)).tobytes() == decode_image(big).tobytes()  # no smaller scale fits
    gray = io.BytesIO()
    photo(2, 120, 90).convert("L").save(gray, "JPEG")
    assert decode_scaled(gray.getvalue(), (30, 30)).mode == "RGB"
    rgba = io.BytesIO()
    Image.new("RGBA", (64, 64), (10, 200, 30, 100)).save(rgba, "PNG")  # not a JPEG: decode_image itself
    assert decode_scaled(rgba.getvalue(), (16, 16)).tobytes() == decode_image(rgba.getvalue()).tobytes()
    for bad in (big[:300], b"<html>", b"\xff\xd8\xff\xe0garbage"):
        with pytest.raises(ImageDecodeError) as a:
            decode_image(bad)
        with pytest.raises(ImageDecodeError) as b:
            decode_scaled(bad, (32, 32))
        assert no_address(str(a.value)) == no_address(str(b.value))


def test_draft_is_opt_in_close_and_recorded(tmp_path, world, model_dir):
    shards = list_shards(world["dir"])
    exact = ContrastiveScorer(str(model_dir), device="cpu")
    draft = ContrastiveScorer(str(model_dir), device="cpu", draft=True)
    assert exact.decode_size is None and draft.decode_size == (32, 32)
    assert "decode" not in exact.info() and draft.info()["decode"] == "jpeg draft >= 32x32"
    score_shards(shards, tmp_path / "exact", exact, batch_size=4)
    score_shards(shards, tmp_path / "draft", draft, batch_size=4)
    a, b = scores(tmp_path / "exact"), scores(tmp_path / "draft")
    assert [r["key"] for r in a] == [r["key"] for r in b]
    diff = {r["key"]: abs(r["score"] - s["score"]) for r, s in zip(a, b) if r["score"] is not None}
    assert max(diff.values()) < 0.02, diff  # the scaled photos move a little (random tiny model)
    assert any(d > 0 for d in diff.values())  # and they were decoded at a reduced scale
    # a folder scored without draft refuses a draft run (and the other way round)
    with pytest.raises(UserError, match="different inputs"):
        score_shards(shards, tmp_path / "exact", draft, batch_size=4)
    with pytest.raises(UserError, match="draft_decode"):
        ContrastiveScorer(str(model_dir), device="cpu", draft=True, pixels="processor")
    assert json.loads((tmp_path / "draft" / "inputs.json").read_text())["scorer"]["decode"] == "jpeg draft >= 32x32"


def test_batch_handover_keeps_every_value_and_type():
    from vlmforge.curate.score import receive_batch, send_batch
    from vlmforge.data.pixels import PixelSlots

    pix = torch.randn(2, 3, 4, 4)
    batch = {"pixel_values": pix, "input_ids": torch.arange(6).view(2, 3), "weights": np.ones(2), "captions": ["a", "b"]}
    got, slot = receive_batch(send_batch(batch, PixelSlots(1, 2)))
    assert slot == -1  # outside a worker the tensor is not copied into a slot
    assert torch.equal(got["pixel_values"], pix) and got["pixel_values"].dtype == torch.float32
    assert torch.equal(got["input_ids"], batch["input_ids"])
    assert isinstance(got["weights"], np.ndarray) and got["captions"] == ["a", "b"]
    assert set(got) == set(batch)
