"""Caption shard I/O: img2dataset layout, byte-stable writing, damage-tolerant reading, decoding."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from vlmforge.errors import UserError
from vlmforge.imagedecode import ImageDecodeError, decode_image
from vlmforge.shards import (
    STANDARD_FIELDS,
    NoShardsError,
    ShardWriter,
    img2dataset_key,
    iter_raw_samples,
    list_shards,
    read_shard_stats,
    read_shard_table,
    sequential_key,
)


def _img(color=(200, 30, 30), mode="RGB", fmt="JPEG", size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def _write(out, n=7, spp=3, failed=(4,), **kw):
    w = ShardWriter(out, samples_per_shard=spp, timestamps=False, **kw)
    keys = []
    for i in range(n):
        key = w.next_key()
        keys.append(key)
        data = None if i in failed else _img((10 * i, 100, 50))
        w.write(key, data, f"caption {i}", {"uid": f"{i:032x}", "url": f"https://x.invalid/{i}.jpg"})
    return w.close(), keys


def test_keys_follow_img2dataset():
    assert img2dataset_key(1, 12, 10_000) == "000010012"  # shard 1, sample 12, 9 digits
    assert img2dataset_key(3, 7, 1000) == "00003007"  # img2dataset's own oom for 1000/shard
    assert sequential_key(0, 500) == "000000000"
    assert sequential_key(501, 500) == "000010001"
    assert sequential_key(2, 500, start_index=4) == "000040002"


def test_writer_layout_members_json_parquet_stats(tmp_path):
    tars, keys = _write(tmp_path)
    assert [os.path.basename(t) for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    for stem in ("00000", "00001", "00002"):
        assert (tmp_path / f"{stem}.parquet").is_file() and (tmp_path / f"{stem}_stats.json").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left
    assert keys == ["000000000", "000000001", "000000002", "000010000", "000010001", "000010002", "000020000"]

    with tarfile.open(tars[1]) as tf:
        members = tf.getmembers()
        # the failed sample (index 4 = key 000010001) is only in parquet, like img2dataset
        assert [m.name for m in members] == [
            "000010000.jpg", "000010000.txt", "000010000.json",
            "000010002.jpg", "000010002.txt", "000010002.json",
        ]  # fmt: skip
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
        jpg = tf.extractfile("000010000.jpg").read()
        meta = json.loads(tf.extractfile("000010000.json").read())
        assert tf.extractfile("000010000.txt").read() == b"caption 3"
    assert list(meta) == list(STANDARD_FIELDS)
    assert meta["sha256"] == hashlib.sha256(jpg).hexdigest()
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (20, 12, 20, 12)
    assert meta["status"] == "success" and meta["error_message"] is None
    assert meta["key"] == "000010000" and meta["caption"] == "caption 3" and meta["uid"] == f"{3:032x}"

    rows = read_shard_table(tars[1]).to_pylist()
    assert [r["key"] for r in rows] == ["000010000", "000010001", "000010002"]
    assert rows[0] == meta
    assert rows[1]["status"] == "failed_to_download" and rows[1]["sha256"] is None
    assert pq.read_schema(str(tmp_path / "00001.parquet")).field("width").type == "int64"
    stats = read_shard_stats(tars[1])
    assert stats["count"] == 3 and stats["successes"] == 2 and stats["failed_to_download"] == 1
    assert stats["failed_to_resize"] == 0 and sum(stats["status_dict"].values()) == 3
    assert {"duration", "start_time", "end_time"} <= set(stats)


def test_writer_is_byte_identical(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_writer_rejects_bad_key_and_abort_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path, samples_per_shard=2)
    with pytest.raises(ValueError):
        w.write("a.b", _img(), "x")
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "x", samples_per_shard=2) as w2:
            w2.write("000000000", _img(), "x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "x") == []


def test_webdataset_reads_written_shards(tmp_path):
    tars, _ = _write(tmp_path)
    ds = wds.WebDataset(tars, shardshuffle=False).decode("pil")
    got = [(s["__key__"], s["jpg"].size, s["txt"], s["json"]["sha256"]) for s in ds]
    assert [g[0] for g in got] == ["000000000", "000000001", "000000002", "000010000", "000010002", "000020000"]
    assert all(g[1] == (20, 12) for g in got) and got[3][2] == "caption 3"


def test_iter_raw_samples_round_trip(tmp_path):
    tars, _ = _write(tmp_path)
    samples = [s for t in tars for s in iter_raw_samples(t)]
    assert len(samples) == 6 and all(s.error is None for s in samples)
    for s in samples:
        assert s.meta["sha256"] == hashlib.sha256(s.image_bytes).hexdigest()
        assert s.meta["caption"] == s.caption and s.meta["key"] == s.key
        assert decode_image(s.image_bytes).size == (20, 12)


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_iter_raw_samples_reports_damage_without_raising(tmp_path):
    good = _img()
    _tar(
        tmp_path / "m.tar",
        [
            ("a.jpg", good), ("a.txt", b"ok"), ("a.json", b"{}"),
            ("b.txt", b"no image"), ("b.json", b"{}"),
            ("c.jpg", good), ("c.txt", b"\xff\xfe bad utf8"), ("c.json", b"{not json"),
            ("d.png", _img(fmt="PNG")), ("d.txt", b"png image"),
        ],
    )  # fmt: skip
    got = {s.key: s for s in iter_raw_samples(tmp_path / "m.tar")}
    assert got["a"].error is None and got["a"].caption == "ok"
    assert "missing image" in got["b"].error and got["b"].caption == "no image"
    assert "utf-8" in got["c"].error and "json" in got["c"].error
    assert got["d"].error is None and got["d"].image_bytes[:4] == b"\x89PNG"

    # Truncated tar: the samples before the cut come back, the last one flagged.
    tars, _ = _write(tmp_path / "w", n=3, spp=3, failed=())
    data = open(tars[0], "rb").read()
    for cut in (700, 1600, 2600):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        out = list(iter_raw_samples(tmp_path / "cut.tar"))
        assert out and out[-1].error and "tar" in out[-1].error
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all")
    out = list(iter_raw_samples(tmp_path / "junk.tar"))
    assert len(out) == 1 and out[0].error and out[0].image_bytes is None
    with pytest.raises(NoShardsError):
        list(iter_raw_samples(tmp_path / "missing.tar"))


def test_list_shards_forms(tmp_path):
    tars, _ = _write(tmp_path)
    assert list_shards(tmp_path) == tars
    assert list_shards(str(tmp_path / "*.tar")) == tars
    assert list_shards(str(tmp_path / "{00000..00001}.tar")) == tars[:2]
    assert list_shards(tars[2]) == [tars[2]]
    assert list_shards([tars[0], str(tmp_path / "0000[12].tar")]) == tars
    with pytest.raises(NoShardsError) as e:
        list_shards(tmp_path / "nothing")
    assert isinstance(e.value, UserError) and "nothing" in str(e.value)


def test_decode_image_modes_and_errors():
    rgb = decode_image(_img((10, 20, 30)))
    assert rgb.mode == "RGB" and rgb.size == (20, 12)
    assert decode_image(_img(128, mode="L")).mode == "RGB"
    cmyk = decode_image(_img((0, 255, 255, 0), mode="CMYK"))  # cyan-free... = red in CMYK
    assert cmyk.mode == "RGB" and cmyk.getpixel((5, 5))[0] > 200
    clear = decode_image(_img((0, 0, 255, 0), mode="RGBA", fmt="PNG"))  # fully transparent blue
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)  # composited on white
    solid = decode_image(_img((0, 0, 255, 255), mode="RGBA", fmt="PNG"))
    assert solid.getpixel((0, 0)) == (0, 0, 255)
    good = _img(size=(64, 64))
    for bad in (good[: len(good) // 2], b"<html>404</html>", b"", None):
        with pytest.raises(ImageDecodeError):
            decode_image(bad)
    with pytest.raises(ImageDecodeError):
        decode_image(good, max_pixels=100)
