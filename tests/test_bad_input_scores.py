"""Scores that cover their shards: `curate filter` refuses a score folder that is empty, lacks a
sidecar for a shard, was written for other bytes of a shard, or lacks a sample's key, naming the
shard; a rerun of `curate score` rescores a shard rewritten in place (and only that one)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_curate import make_world

from vlmforge.cli import main
from vlmforge.shards import iter_raw_samples, list_shards


class MeanScorer:
    """A stand-in scorer: the image's mean brightness (what curate score needs of a scorer)."""

    def info(self) -> dict:
        return {"scorer": "mean"}

    def prepare(self, images, captions) -> dict:
        return {"v": [float(np.asarray(im.convert("L")).mean()) / 255.0 for im in images]}

    def score(self, batch) -> dict:
        return {"score": np.asarray(batch["v"], dtype=np.float32)}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("scores") / "world")["dir"]


@pytest.fixture
def world(pristine, tmp_path) -> Path:
    """A private copy: these tests rewrite shards in place."""
    return Path(shutil.copytree(pristine, tmp_path / "world"))


def score(world: Path, out: Path) -> dict:
    from vlmforge.curate.score import score_shards

    return score_shards([os.path.abspath(p) for p in list_shards(str(world))], out, MeanScorer(), batch_size=8)


def filter_argv(world: Path, scores: Path, out: Path) -> list[str]:
    return ["curate", "filter", "--in", str(world), "--scores", f"m={scores}", "--keep", "m>=0.0", "--out", str(out)]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def rewrite_in_place(shard: Path, source: Path) -> None:
    """Replace a shard's bytes with another shard's (other keys), as a re-download would."""
    data = source.read_bytes()
    shard.write_bytes(data)
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # a later mtime, whatever the clock


def test_filter_refuses_an_empty_score_folder(world, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(filter_argv(world, tmp_path / "empty", tmp_path / "kept")) == 2
    line = one_error_line(capsys)
    assert "holds no score sidecars" in line and str(tmp_path / "empty") in line
    assert not (tmp_path / "kept" / "manifest.json").exists()


def test_filter_refuses_a_missing_sidecar_naming_the_shard(world, tmp_path, capsys):
    score(world, tmp_path / "s")
    shards = list_shards(str(world))
    (tmp_path / "s" / "00001.parquet").unlink()
    assert main(filter_argv(world, tmp_path / "s", tmp_path / "kept")) == 2
    line = one_error_line(capsys)
    assert "no score sidecar for shard" in line and os.path.abspath(shards[1]) in line
    assert not (tmp_path / "kept" / "manifest.json").exists()


def test_filter_refuses_a_stale_sidecar(world, tmp_path, capsys):
    score(world, tmp_path / "s")
    assert main(filter_argv(world, tmp_path / "s", tmp_path / "ok")) == 0  # fresh scores: accepted
    capsys.readouterr()
    rewrite_in_place(world / "00000.tar", world / "00001.tar")
    assert main(filter_argv(world, tmp_path / "s", tmp_path / "kept")) == 2
    line = one_error_line(capsys)
    assert "changed since" in line and str(world / "00000.tar") in line
    assert not (tmp_path / "kept" / "manifest.json").exists()


def test_filter_refuses_a_sidecar_that_does_not_cover_its_shard(world, tmp_path, capsys):
    folder = tmp_path / "hand"
    folder.mkdir()
    for t in list_shards(str(world)):  # hand-written sidecars (no signature); 00001's lacks its first key
        keys = [s.key for s in iter_raw_samples(t)]
        if Path(t).name == "00001.tar":
            keys = keys[1:]
        pq.write_table(pa.table({"key": keys, "uid": [None] * len(keys), "score": pa.array([0.5] * len(keys), pa.float32()),
                                 "error": pa.array([None] * len(keys), pa.string())}), folder / (Path(t).stem + ".parquet"))
    assert main(filter_argv(world, folder, tmp_path / "kept")) == 2
    line = one_error_line(capsys)
    assert "does not cover shard" in line and "00001.tar" in line and "1 of its samples" in line


def test_score_rerun_rescores_a_rewritten_shard(world, tmp_path):
    out = tmp_path / "s"
    score(world, out)
    keys1 = [s.key for s in iter_raw_samples(str(world / "00001.tar"))]
    untouched = (out / "00002.parquet").stat().st_mtime_ns
    rewrite_in_place(world / "00000.tar", world / "00001.tar")
    score(world, out)
    assert pq.read_table(out / "00000.parquet").column("key").to_pylist() == keys1  # rescored: the new content
    assert (out / "00002.parquet").stat().st_mtime_ns == untouched  # the others are not redone
    assert main(filter_argv(world, out, tmp_path / "kept")) == 0  # and filter accepts the fresh folder


def test_a_touched_but_unchanged_shard_is_not_rescored(world, tmp_path):
    out = tmp_path / "s"
    score(world, out)
    before = (out / "00000.parquet").stat().st_mtime_ns
    st = (world / "00000.tar").stat()
    os.utime(world / "00000.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, new mtime
    score(world, out)
    assert (out / "00000.parquet").stat().st_mtime_ns == before  # sha256 unchanged: kept
