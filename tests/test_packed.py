"""vlmforge pack (packed shards, manifest, bad input) and the packed-sequence loader."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_tokenizer import shape_sentences
from PIL import Image

from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.data.pretrain.loader import PackedDataError, PackedDataset, PackedLoader
from vlmforge.data.pretrain.packed_shards import PackedShardReader, list_packed_shards
from vlmforge.data.pretrain.plan import pack_shards
from vlmforge.errors import UserError
from vlmforge.shards import ShardWriter

N_SAMPLES = 90
FAULTS = {5: "undecodable_image", 6: "empty_caption", 13: "undecodable_image"}
# Tiny model: 64 px SigLIP, 8x8 grid pooled to 4x4 = 16 visual tokens per image.
OVERRIDES = ["model.projector.pool_size=4", "pack.max_len=160", "pack.window=40", "seed=3"]


def _image(i: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    arr = np.random.default_rng(i).integers(0, 255, (30 + i % 17, 41, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory) -> tuple[str, list[str]]:
    out = tmp_path_factory.mktemp("captions")
    sents = shape_sentences(N_SAMPLES, seed=7)
    keys = []
    with ShardWriter(out, samples_per_shard=32, timestamps=False) as w:
        for i in range(N_SAMPLES):
            img, cap = _image(i), sents[i]
            if i == 5:
                img = b"definitely not an image"
            if i == 6:
                cap = "  "
            if i == 13:
                img = _image(i)[:200]  # truncated JPEG
            if i == 8:
                img = _image(i, "L")
            if i == 9:
                img = _image(i, "CMYK")
            if i == 10:
                img = _image(i, "RGBA", "PNG")
            if i == 11:
                cap = " ".join(sents[:40])  # far longer than max_len
            key = w.next_key()
            keys.append(key)
            w.write(key, img, cap, {})
    return str(out), keys


def _pack(caption_shards, tok, out, *extra):
    cfg = load_recipe(None, OVERRIDES + list(extra))
    return pack_shards(cfg, [caption_shards[0]], out, tok, progress=False), cfg


@pytest.fixture(scope="module")
def packed(caption_shards, tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    manifest, cfg = _pack(caption_shards, tiny_tokenizer_dir, out)
    return str(out), manifest, cfg


def _all_packs(folder):
    for p in list_packed_shards(folder):
        r = PackedShardReader(p)
        for j in range(len(r)):
            yield r.read_pack(j)


def test_every_sample_packed_once_or_counted_and_no_pack_too_long(packed, caption_shards):
    folder, manifest, _ = packed
    seen = [s["key"] for meta, _, _ in _all_packs(folder) for s in meta["samples"]]
    assert len(seen) == len(set(seen))
    _, keys = caption_shards
    dropped_keys = {keys[i] for i in FAULTS}
    assert set(seen) == set(keys) - dropped_keys
    assert manifest["dropped"] == {"empty_caption": 1, "undecodable_image": 2}
    c = manifest["counts"]
    assert c["samples_read"] == N_SAMPLES == c["samples_packed"] + sum(manifest["dropped"].values())
    assert c["truncated"] == 1 and c["shards"] == 3
    geo = manifest["geometry"]
    for meta, tokens, images in _all_packs(folder):
        n_img = sum(s["images"] for s in meta["samples"])
        length = sum(s["n_text"] + int(s["sep"]) for s in meta["samples"]) + n_img * geo["visual_tokens"]
        assert length == meta["length"] <= geo["max_len"] == 160
        assert tokens.size == sum(s["n_text"] for s in meta["samples"]) and len(images) == n_img
    assert 0 < manifest["fill"]["mean_fill"] <= manifest["fill"]["lower_bound_fill"] <= 1
    assert sum(manifest["length_histogram"]["counts"]) == c["samples_packed"]
    assert (Path(folder) / "config.yaml").is_file()


def test_images_kept_as_original_bytes_and_no_pickle(packed, caption_shards):
    folder, _, _ = packed
    for tar in Path(folder).glob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                data = tf.extractfile(m).read()
                assert m.name.rsplit(".", 1)[-1] in ("json", "npy", "jpg", "png"), m.name
                assert not data.startswith(b"\x80"), f"{m.name} looks like a pickle"
                if m.name.endswith(".npy"):
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
                    assert arr.dtype == np.int32
    for f in Path(folder).rglob("*"):
        assert f.suffix not in (".pkl", ".pickle", ".pt", ".pth", ".bin"), f
    # original bytes, not re-encoded: the PNG (sample 10) is stored byte-identically
    png = _image(10, "RGBA", "PNG")
    assert any(png in images for _, _, images in _all_packs(folder))


def test_too_long_drop_mode_and_strict_mode(caption_shards, tiny_tokenizer_dir, tmp_path):
    manifest, _ = _pack(caption_shards, tiny_tokenizer_dir, tmp_path / "drop", "pack.too_long=drop")
    assert manifest["dropped"]["too_long"] == 1 and manifest["counts"]["truncated"] == 0
    with pytest.raises(UserError, match=r"00000\.tar: sample '\d+': undecodable_image: cannot decode"):
        _pack(caption_shards, tiny_tokenizer_dir, tmp_path / "strict", "pack.strict=true")


def test_text_mixing_reaches_ratio(caption_shards, tiny_tokenizer_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(shape_sentences(3, seed=i))}) + "\n" for i in range(400)))
    manifest, _ = _pack(caption_shards, tiny_tokenizer_dir, tmp_path / "mix",
                        f"pack.text_corpus={corpus}", "pack.text_ratio=0.3333", "pack.text_chunk_len=40")
    mix = manifest["text_mix"]
    assert abs(mix["achieved_ratio"] - 0.3333) < 0.05 and not mix["corpus_exhausted"]
    assert manifest["counts"]["text_samples"] > 0
    ds = PackedDataset(str(tmp_path / "mix"))
    kinds = {s["kind"] for meta, _, _ in _all_packs(tmp_path / "mix") for s in meta["samples"]}
    assert kinds == {"image", "text"} and len(ds) > 0


def test_pack_cli_in_process(caption_shards, tiny_tokenizer_dir, tmp_path, capsys):
    args = ["pack", "--in", caption_shards[0], "--out", str(tmp_path / "p"), "--tokenizer", tiny_tokenizer_dir,
            "--no-progress"] + [x for o in OVERRIDES for x in ("--set", o)]
    assert main(args) == 0
    assert "mean fill" in capsys.readouterr().out
    assert main(args) == 2  # refuses to overwrite without --overwrite
    assert main(args + ["--overwrite"]) == 0


# -------------------------------------------------------------------------- loader


def _check_batch(batch, ds, supervise_sep=True):
    ids, labels, pos, seq = batch["input_ids"], batch["labels"], batch["position_ids"], batch["seq_ids"]
    pad = seq == -1
    first = torch.zeros_like(pad)
    first[:, 0] = True
    first[:, 1:] = seq[:, 1:] != seq[:, :-1]
    first &= ~pad
    ignored = (ids == ds.image_token_id) | pad | first
    if not supervise_sep:
        ignored |= ids == ds.sep_id
    assert torch.equal(labels == -100, ignored)  # exactly the visual/placeholder/pad/first positions
    assert torch.equal(labels[~ignored], ids[~ignored])
    assert (ids[pad] == ds.pad_id).all() and (pos[pad] == 0).all()
    for r in range(ids.shape[0]):  # positions restart at 0 for each sample
        for s in seq[r].unique().tolist():
            if s >= 0:
                p = pos[r][seq[r] == s]
                assert torch.equal(p, torch.arange(p.numel()))
    n_img = int((ids == ds.image_token_id).sum()) // ds.visual_tokens
    assert batch["pixel_values"].shape == (n_img, 3, 64, 64)


@pytest.mark.parametrize("supervise_sep", [True, False])
def test_batch_contract_labels_positions(packed, supervise_sep):
    folder, _, _ = packed
    ds = PackedDataset(folder, visual_tokens=16, supervise_sep=supervise_sep)
    loader = PackedLoader(ds, batch_size=3, seed=0, rank=0, world_size=1, pad_to=ds.max_len)
    for batch in loader:
        assert batch["input_ids"].shape[1] == 160
        _check_batch(batch, ds, supervise_sep)


def test_loader_resume_mid_epoch_yields_same_continuation(packed):
    folder, _, _ = packed
    ds = PackedDataset(folder, visual_tokens=16)
    ref = PackedLoader(ds, batch_size=2, seed=11, rank=0, world_size=1, num_workers=0)
    full = [b["input_ids"] for b in ref] + [b["input_ids"] for b in ref]  # two epochs
    a = PackedLoader(ds, batch_size=2, seed=11, rank=0, world_size=1, num_workers=1)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    del it
    b = PackedLoader(ds, batch_size=2, seed=11, rank=0, world_size=1, num_workers=0)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    rest = [x["input_ids"] for x in b] + [x["input_ids"] for x in b]
    assert len(rest) == len(full) - 3
    assert all(torch.equal(x, y) for x, y in zip(rest, full[3:]))
    with pytest.raises(PackedDataError, match="seed"):
        PackedLoader(ds, batch_size=2, seed=12, rank=0, world_size=1).load_state_dict(state)


def test_two_rank_split_disjoint_and_complete(packed):
    folder, _, _ = packed
    ds = PackedDataset(folder, visual_tokens=16)
    n = len(ds)
    for bs in (1, 2, 3):
        plans = [PackedLoader(ds, batch_size=bs, seed=5, rank=r, world_size=2).epoch_plan(0) for r in range(2)]
        assert plans[0].shape == plans[1].shape and plans[0].size > 0  # equal batch counts per rank
        flat = np.concatenate([p.ravel() for p in plans])
        assert set(flat.tolist()) == set(range(n))  # complete
        assert flat.size - n < 2 * bs  # disjoint except the wrapped remainder
        if n % (2 * bs) == 0:
            assert flat.size == n
    drop = [PackedLoader(ds, batch_size=2, seed=5, rank=r, world_size=2, remainder="drop").epoch_plan(0) for r in range(2)]
    both = np.concatenate([p.ravel() for p in drop])
    assert len(set(both.tolist())) == both.size == (n // 4) * 4  # disjoint


def test_fewer_packs_than_ranks_times_workers(caption_shards, tiny_tokenizer_dir, tmp_path):
    manifest, _ = _pack(caption_shards, tiny_tokenizer_dir, tmp_path / "few", "pack.max_len=4096", "pack.window=1000")
    assert manifest["counts"]["shards"] == 1
    ds = PackedDataset(str(tmp_path / "few"), visual_tokens=16)
    assert len(ds) == 1
    for rank in range(4):  # 4 ranks x 2 workers on one shard holding one pack: nobody gets zero
        loader = PackedLoader(ds, batch_size=1, seed=0, rank=rank, world_size=4, num_workers=2)
        batches = list(loader)
        assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 1


def test_visual_token_mismatch_is_an_error(packed):
    with pytest.raises(PackedDataError, match="16 visual tokens"):
        PackedDataset(packed[0], visual_tokens=64)


def test_image_preprocessing_matches_transformers_siglip():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from vlmforge.images import load_pixel_values

    ref = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    spec = dict(size=64, mean=[0.5] * 3, std=[0.5] * 3, rescale=1 / 255)
    for i, (mode, fmt) in enumerate([("RGB", "JPEG"), ("L", "PNG"), ("CMYK", "JPEG")]):
        data = _image(i, mode, fmt)
        ours = load_pixel_values(data, spec)
        theirs = ref(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="np")["pixel_values"][0]
        assert np.abs(ours.numpy() - theirs).max() < 1e-5


def test_pixel_values_match_pack_images_in_order(packed):
    from vlmforge.images import load_pixel_values

    folder, _, _ = packed
    ds = PackedDataset(folder, visual_tokens=16)
    reader = ds.readers[0]
    _, _, images = reader.read_pack(0)
    expect = torch.stack([load_pixel_values(b, ds.image_spec) for b in images])
    one = PackedLoader(ds, batch_size=1, shuffle=False, rank=0, world_size=1)
    assert torch.equal(next(iter(one))["pixel_values"], expect)  # one pack: zero-copy path
    two = PackedLoader(ds, batch_size=2, shuffle=False, rank=0, world_size=1)
    assert torch.equal(next(iter(two))["pixel_values"][: len(images)], expect)  # concatenated path


class _TrainerLike:
    """The trainer's use of a loader (vlmforge.train.loop): set_epoch + iter, StopIteration -> next epoch."""

    def __init__(self, loader):
        self.loader, self.epoch, self.it = loader, 0, None

    def start(self):
        self.loader.set_epoch(self.epoch)
        self.it = iter(self.loader)

    def next(self):
        if self.it is None:
            self.start()
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            self.start()
            return next(self.it)

    def state(self):
        return {"epoch": self.epoch, "data": self.loader.state_dict()}

    def resume(self, state):
        self.epoch = state["epoch"]
        self.loader.set_epoch(self.epoch)
        self.loader.load_state_dict(state["data"])
        self.it = iter(self.loader)


def test_loader_from_recipe_resumes_in_trainer_loop_across_epoch_boundary(packed, tiny_tokenizer_dir):
    from vlmforge.text.tokenization import load_tokenizer

    folder, _, _ = packed
    cfg = load_recipe(None, OVERRIDES + [f"train.data_path={folder}", "train.micro_batch_size=2"])
    tok = load_tokenizer(tiny_tokenizer_dir)

    def make():
        return PackedLoader(folder, cfg, tokenizer=tok, batch_size=2, seed=0, rank=0, world_size=1)

    per_epoch = len(make())
    ref = _TrainerLike(make())
    full = [ref.next()["input_ids"] for _ in range(2 * per_epoch + 2)]
    assert full[0].shape[1] == 160  # data.pad_to_max_len
    for stop in (per_epoch, per_epoch + 1):  # exactly at the epoch boundary, and just after it
        a = _TrainerLike(make())
        for _ in range(stop):
            a.next()
        state = json.loads(json.dumps(a.state()))
        b = _TrainerLike(make())
        b.resume(state)
        rest = [b.next()["input_ids"] for _ in range(len(full) - stop)]
        assert all(torch.equal(x, y) for x, y in zip(rest, full[stop:]))


def test_damaged_tar_is_counted_not_fatal(caption_shards, tiny_tokenizer_dir, tmp_path):
    src = Path(caption_shards[0]) / "00001.tar"
    shards = tmp_path / "shards"
    shards.mkdir()
    data = src.read_bytes()
    (shards / "00000.tar").write_bytes(data)
    (shards / "00001.tar").write_bytes(data[: len(data) // 2])  # cut mid-member
    cfg = load_recipe(None, OVERRIDES)
    manifest = pack_shards(cfg, [str(shards)], tmp_path / "out", tiny_tokenizer_dir, progress=False)
    assert manifest["dropped"].get("damaged_tar", 0) >= 1
    c = manifest["counts"]
    assert c["samples_read"] == c["samples_packed"] + sum(manifest["dropped"].values())
    assert c["samples_packed"] > 32


def test_reader_file_lru_alternating_shards(packed, monkeypatch):
    from vlmforge.data.pretrain import packed_shards

    folder, _, _ = packed
    ds = PackedDataset(folder, visual_tokens=16)
    first = [ds[i] for i in range(len(ds))]
    monkeypatch.setattr(packed_shards, "MAX_OPEN_FILES", 1)
    while packed_shards._OPEN:
        packed_shards._OPEN.popitem()[1].close()
    order = np.argsort(np.arange(len(ds)) % 3, kind="stable")[::-1]  # hop between shards
    for i in order:
        again = ds[int(i)]
        assert [s["input_ids"].tolist() for s in again] == [s["input_ids"].tolist() for s in first[i]]
    assert len(packed_shards._OPEN) == 1


def test_carry_over_keeps_every_sample_exactly_once(caption_shards, tiny_tokenizer_dir, tmp_path):
    _, keys = caption_shards
    out = tmp_path / "carry"
    manifest, _ = _pack(caption_shards, tiny_tokenizer_dir, out, "pack.max_len=320")  # exact-fit path
    seen = {}
    for idx in list_packed_shards(out):
        r = PackedShardReader(idx)
        for j in range(len(r)):
            meta, _, _ = r.read_pack(j)
            assert meta["length"] <= 320
            for s in meta["samples"]:
                assert s["key"] not in seen
                seen[s["key"]] = idx.name
    assert set(seen) == set(keys) - {keys[i] for i in FAULTS}
    assert manifest["counts"]["samples_packed"] == len(seen)
    assert sum(manifest["length_histogram"]["counts"]) == len(seen)
    window0 = set(keys[:40])  # pack.window=40
    assert any(k in window0 for k, shard in seen.items() if not shard.startswith("00000"))  # carried
