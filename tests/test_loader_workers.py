"""The packed and SFT loaders with DataLoader workers give the one-process batches bit for bit (workers
hand uint8 pixels over through reused shared buffers and the main process normalises them), resume
exactly, and count skipped samples alike."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from fixtures_tokenizer import shape_sentences
from PIL import Image

from vlmforge.arch.geometry import preprocess_spec_for
from vlmforge.config import load_recipe
from vlmforge.data.collate import collate_packs
from vlmforge.data.pixels import PixelSlots, normalise_pixels, pixels_of, receive_from_worker, send_from_worker
from vlmforge.data.pretrain import loader as pretrain_loader
from vlmforge.data.pretrain.loader import build_pretrain_loader
from vlmforge.data.pretrain.plan import pack_shards
from vlmforge.data.sft.build import build_index
from vlmforge.data.sft.loader import build_sft_loader
from vlmforge.images import preprocess, preprocess_batch
from vlmforge.shards import ShardWriter
from vlmforge.text.tokenization import load_tokenizer

N = 36
OVERRIDES = ["model.projector.pool_size=4", "pack.max_len=96", "pack.window=40", "seed=5"]


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    im = Image.fromarray(rng.integers(0, 255, (20 + i % 13, 30 + i % 7, 3), dtype=np.uint8))
    return im.convert(["RGB", "L", "RGBA", "CMYK"][i % 4])


def _encoded(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, "PNG" if i % 4 == 2 else "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("loader_workers")
    captions = shape_sentences(N, seed=3)
    with ShardWriter(root / "shards", samples_per_shard=16, timestamps=False) as w:
        for i in range(N):
            w.write(w.next_key(), _encoded(i), captions[i], {})
    cfg = load_recipe(None, OVERRIDES + [f"train.data_path={root / 'packed'}", "train.micro_batch_size=2"])
    pack_shards(cfg, [str(root / "shards")], root / "packed", tiny_tokenizer_dir, progress=False)
    (root / "images").mkdir()
    records = []
    for i in range(N):
        (root / "images" / f"{i}.img").write_bytes(_encoded(i))
        turns = [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": captions[i]}]
        if i % 5 == 0:
            turns += [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": captions[(i + 1) % N]}]
        records.append({"image": f"{i}.img", "conversations": turns})
    (root / "sft.json").write_text(json.dumps(records))
    build_index([str(root / "sft.json")], root / "index", visual_tokens=16, image_root=str(root / "images"),
                tokenizer=tiny_tokenizer_dir, progress=False)
    (root / "images" / "7.img").unlink()  # gone after indexing: skipped and counted at load time
    return root, cfg


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def test_packed_workers_give_the_one_process_batches_and_resume(data):
    _, cfg = data
    one = []
    for w in (0, 2):
        cfg.data.num_workers = w
        one.append(list(build_pretrain_loader(cfg, rank=0, world_size=1)))
    _same(*one)
    assert one[0][0]["pixel_values"].dtype == torch.float32 and one[0][0]["pixel_values"].shape[0] > 2
    cfg.data.num_workers = 2
    loader = build_pretrain_loader(cfg, rank=0, world_size=1)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    cfg.data.num_workers = 1
    resumed = build_pretrain_loader(cfg, rank=0, world_size=1)
    resumed.load_state_dict(state)
    _same(head + list(resumed), one[0])


@pytest.mark.parametrize("batching", ["pack", "length_group"])
def test_sft_workers_give_the_one_process_batches_and_skips(data, tiny_tokenizer_dir, batching):
    root, _ = data
    tok = load_tokenizer(tiny_tokenizer_dir)
    runs, skipped = [], []
    for w in (0, 2):
        cfg = load_recipe(None, OVERRIDES + [f"sft.index={root / 'index'}", f"sft.image_root={root / 'images'}",
                                             f"sft.batching={batching}", "sft.max_len=128", f"sft.num_workers={w}"])
        loader = build_sft_loader(cfg, tok, batch_size=3, rank=0, world_size=1)
        runs.append(list(loader))
        skipped.append(loader.skipped)
    _same(*runs)
    assert skipped[0] == skipped[1] == {"missing_image": 1}
    images = sum(b["pixel_values"].shape[0] for b in runs[0])
    assert images == N - 1


@pytest.mark.parametrize("model_type", ["siglip_vision_model", "clip_vision_model"])
def test_uint8_then_normalise_is_bit_identical_to_preprocess(model_type):
    spec = preprocess_spec_for(model_type, 24)
    images = [_image(i) for i in range(8)]
    want = torch.stack([preprocess(im, spec) for im in images])
    assert torch.equal(pixels_of(images, spec), want)
    assert torch.equal(preprocess_batch(images, spec), want)
    u8 = pixels_of(images, spec, as_uint8=True)
    assert u8.dtype == torch.uint8 and torch.equal(normalise_pixels(u8, spec), want)


def test_pixel_slots_reuse_their_buffers_and_fall_back_when_busy(monkeypatch):
    slots = PixelSlots(workers=2, per_worker=2)
    x = torch.arange(24, dtype=torch.uint8).view(2, 3, 2, 2)
    assert slots.put(x) == (x, -1)  # not in a worker: nothing to share
    monkeypatch.setattr(pretrain_loader.tud, "get_worker_info", lambda: type("Info", (), {"id": 1})())
    a, sa = slots.put(x)
    b, sb = slots.put(x + 1)
    assert (sa, sb) == (2, 3) and torch.equal(a, x) and torch.equal(b, x + 1) and a.is_shared()
    assert slots.put(x)[1] == -1  # both of worker 1's buffers busy: a fresh segment instead
    slots.release(sa, a)
    c, sc = slots.put(x + 2)
    assert sc == sa and c.data_ptr() == a.data_ptr() and torch.equal(c, x + 2)  # the freed buffer, reused
    big = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    slots.release(sb, b)
    d, sd = slots.put(big)
    assert sd == sb and d.shape == big.shape  # grown to fit


def test_pixels_are_written_in_a_slot_and_each_buffer_crosses_once(monkeypatch):
    """A worker writes a batch's uint8 pixels straight into a free buffer (sent without a copy); a
    buffer crosses to the main process with its first batch only, later batches in it name it and
    their shape, and the main process gets the same normalised pixels either way."""
    slots = PixelSlots(workers=1, per_worker=2)
    monkeypatch.setattr(pretrain_loader.tud, "get_worker_info", lambda: type("Info", (), {"id": 0})())
    spec = preprocess_spec_for("siglip_vision_model", 24)
    crossed = []
    for k, n in enumerate([3, 3, 3, 5, 3]):
        images = [_image(i) for i in range(k, k + n)]
        pixels = pixels_of(images, spec, as_uint8=True, slots=slots)
        assert pixels.is_shared() and slots.reserved[0] is pixels
        batch = collate_packs([[{"input_ids": np.arange(4), "pixel_values": pixels[:2]}],
                               [{"input_ids": np.arange(3), "pixel_values": pixels[2:]}]], pad_id=0)
        assert batch["pixel_values"] is pixels  # the collated batch hands the slot's tensor over as it is
        sent = send_from_worker(batch, slots)
        assert slots.reserved is None and sent["pixel_slot"] == k % 2
        crossed.append(sent["pixel_values"] is not None)
        got = receive_from_worker(sent, spec, slots)
        assert list(got) == list(batch) and torch.equal(got["pixel_values"], pixels_of(images, spec))
        assert torch.equal(got["input_ids"], batch["input_ids"])
    # the 5-image batch outgrows buffer 1: the grown buffer crosses again
    assert crossed == [True, True, False, True, False]
