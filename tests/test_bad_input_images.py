"""Images that used to be decoded wrongly or counted under the wrong reason (issue 22, point 6):
16-bit PNGs, the pixel cap, and a truncated tar whose ``_stats.json`` counts more samples."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmforge.cli import main
from vlmforge.imagedecode import MAX_PIXELS, ImageDecodeError, ImageTooLargeError, decode_image, header_size
from vlmforge.shards import ShardWriter


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size=(16, 12), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A tiny JPEG whose frame header (SOF0) claims width x height: the cap fires on the header."""
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


# -- high-depth modes ---------------------------------------------------------------------------
def test_16bit_png_decodes_to_scaled_8bit_values():
    values = np.array([[0, 257, 257 * 100], [257 * 200, 65535, 32896]], dtype=np.uint16)
    data = _png(values)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = np.asarray(decode_image(data))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[..., 0].tolist() == [[0, 1, 100], [200, 255, 128]]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_float_image_in_unit_range_is_scaled():
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    buf = io.BytesIO()
    im.save(buf, "TIFF")
    assert np.asarray(decode_image(buf.getvalue()))[0, :, 0].tolist() == [0, 128, 255]


def test_grey_with_alpha_is_composited_on_white():
    la = np.zeros((1, 2, 2), np.uint8)
    la[0, 0] = (0, 0)  # fully transparent black -> white
    la[0, 1] = (0, 255)  # opaque black stays black
    rgb = np.asarray(decode_image(_png(la, "LA")))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [0, 0, 0]


# -- the pixel cap ----------------------------------------------------------------------------
def test_huge_jpeg_is_image_too_large_with_the_cap_in_the_message():
    data = _jpeg_claiming(10_000, 10_000)
    with pytest.raises(ImageTooLargeError, match=r"10000x10000 .*cap of 50000000 pixels") as e:
        decode_image(data)
    assert e.value.reason == "image_too_large" and isinstance(e.value, ImageDecodeError)


def test_lowered_cap_names_itself():
    data = _png(np.zeros((101, 100, 3), np.uint8))
    with pytest.raises(ImageTooLargeError, match=r"100x101 = 10100 pixels, over the cap of 10000 pixels"):
        decode_image(data, max_pixels=10_000)
    assert decode_image(data, max_pixels=10_100).size == (100, 101)


def test_header_size_reads_a_png_from_bytes_or_a_path(tmp_path):
    data = _png(np.zeros((7, 30, 3), np.uint8))
    (tmp_path / "a.png").write_bytes(data)
    assert header_size(data) == header_size(tmp_path / "a.png") == header_size(str(tmp_path / "a.png")) == (30, 7)
    assert header_size(data) == decode_image(data).size
    with pytest.raises(FileNotFoundError):
        header_size(tmp_path / "none.png")


def test_header_size_of_what_is_not_an_image_is_a_decode_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image at all")
    for bad in (b"not an image at all", b"", tmp_path / "x.png"):
        with pytest.raises(ImageDecodeError) as e:
            header_size(bad)
        assert not isinstance(e.value, ImageTooLargeError)


def test_header_size_refuses_what_the_decode_refuses():
    with pytest.raises(ImageTooLargeError, match=rf"10000x10000 .*cap of {MAX_PIXELS} pixels"):
        header_size(_jpeg_claiming(10_000, 10_000))
    assert header_size(_jpeg_claiming(10_000, 10_000), max_pixels=None) == (10_000, 10_000)
    # 400M pixels: over twice PIL's Image.MAX_IMAGE_PIXELS, so PIL's open() raises DecompressionBombError
    # (neither a ValueError nor an OSError): too large, as from decode_image
    bomb = _jpeg_claiming(20_000, 20_000)
    for read in (header_size, decode_image):
        with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS") as e:
            read(bomb, max_pixels=None)
        assert e.value.reason == "image_too_large"


def _shards(tmp_path: Path, images: list[bytes]) -> Path:
    folder = tmp_path / "raw"
    with ShardWriter(folder, samples_per_shard=100, timestamps=False) as w:
        for i, img in enumerate(images):
            w.write(w.next_key(), img, f"a red circle number {i}", {"uid": f"{i:032x}"})
    return folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_curate_counts_the_huge_image_as_image_too_large_with_shard_and_key(tmp_path):
    images = [_jpeg(seed=i) for i in range(4)] + [_jpeg_claiming(10_000, 10_000)]
    raw = _shards(tmp_path, images)
    out = tmp_path / "dedup"
    assert main(["curate", "dedup", "--in", str(raw), "--out", str(out), "--exact", "uid", "--near", "none"]) == 0
    m = _manifest(out)
    assert m["dropped"] == {"image_too_large": 1} and m["counts"]["kept"] == 4
    ex = m["dropped_examples"]["image_too_large"][0]
    assert ex["shard"].endswith("00000.tar") and ex["key"] == "000000004" and "cap of" in ex["error"]


def test_pack_counts_the_huge_image_as_image_too_large(tmp_path, tiny_tokenizer_dir):
    from vlmforge.config import load_recipe
    from vlmforge.data.pretrain.plan import pack_shards

    raw = _shards(tmp_path, [_jpeg(seed=i) for i in range(4)] + [_jpeg_claiming(10_000, 10_000)])
    cfg = load_recipe(None, ["model.projector.pool_size=4", "pack.max_len=160"])
    m = pack_shards(cfg, [str(raw)], tmp_path / "packed", tiny_tokenizer_dir, progress=False)
    assert m["dropped"] == {"image_too_large": 1}
    ex = m["dropped_examples"]["image_too_large"][0]
    assert ex["shard"].endswith("00000.tar") and ex["key"] == "000000004"


def test_tiled_pack_without_the_image_check_counts_a_huge_header_as_image_too_large(tmp_path, tiny_tokenizer_dir):
    from vlmforge.config import load_recipe
    from vlmforge.data.pretrain.plan import pack_shards

    images = [_jpeg(seed=i) for i in range(4)] + [_jpeg_claiming(10_000, 10_000), b"not an image at all"]
    raw = _shards(tmp_path, images)
    cfg = load_recipe(None, ["model.projector.pool_size=4", "pack.max_len=160", "model.images.tiles=true",
                             "model.images.max_tiles=4", "pack.check_images=false"])
    m = pack_shards(cfg, [str(raw)], tmp_path / "packed", tiny_tokenizer_dir, progress=False)
    assert m["dropped"] == {"image_too_large": 1, "undecodable_image": 1} and m["counts"]["samples_packed"] == 4
    assert m["dropped_examples"]["image_too_large"][0]["key"] == "000000004"


# -- a truncated tar against its _stats.json ---------------------------------------------------
def _truncate(tar: Path) -> None:
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])


def test_curate_reports_a_truncated_tars_shortfall_as_missing_samples(tmp_path):
    raw = _shards(tmp_path, [_jpeg(seed=i) for i in range(10)])
    _truncate(raw / "00000.tar")
    out = tmp_path / "dedup"
    assert main(["curate", "dedup", "--in", str(raw), "--out", str(out), "--exact", "uid", "--near", "none"]) == 0
    m = _manifest(out)
    (short,) = m["missing_samples"]
    assert short["shard"].endswith("00000.tar") and short["expected"] == 10
    assert short["missing"] == 10 - short["read"] > 0
    assert m["counts"]["missing_samples"] == short["missing"] and m["counts"]["reconciled"] is False


def test_pack_reports_a_truncated_tars_shortfall_as_missing_samples(tmp_path, tiny_tokenizer_dir):
    from vlmforge.config import load_recipe
    from vlmforge.data.pretrain.plan import pack_shards

    raw = _shards(tmp_path, [_jpeg(seed=i) for i in range(10)])
    _truncate(raw / "00000.tar")
    cfg = load_recipe(None, ["model.projector.pool_size=4", "pack.max_len=160"])
    m = pack_shards(cfg, [str(raw)], tmp_path / "packed", tiny_tokenizer_dir, progress=False)
    (short,) = m["missing_samples"]
    assert short["expected"] == 10 and m["counts"]["missing_samples"] == short["missing"] > 0
