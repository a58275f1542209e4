"""Errors a person can read: a user's mistake is one line naming the file, key or path, exit 2, no
traceback (`vlmforge --debug` shows it); every stage refuses a non-empty output folder unless
--overwrite (curate resumes), and an output path that cannot be created is refused naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_curate import make_world as make_caption_world
from test_eval import make_world as make_eval_world

from vlmforge.cli import main


def one_error_line(capsys) -> str:
    """The single `vlmforge CMD: error: ...` line on stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def sft_data(tmp_path) -> Path:
    """Two text-only LLaVA records and an images folder."""
    d = tmp_path / "sft"
    (d / "images").mkdir(parents=True)
    recs = [{"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}."}]} for i in range(2)]
    (d / "data.json").write_text(json.dumps(recs))
    return d


def sft_index_argv(sft_data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft-index", "--input", str(sft_data / "data.json"), "--out", str(out), "--lengths", "estimate",
            "--visual-tokens", "4", *extra]


# -- --debug ------------------------------------------------------------------------------
def test_debug_flag_shows_the_traceback(sft_data, tmp_path, capsys):
    argv = sft_index_argv(sft_data, tmp_path / "idx", "--image-root", str(tmp_path / "nope"))
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UserError" in err
    assert err.strip().splitlines()[-1].startswith("vlmforge sft-index: error: --image-root")


# -- inputs that are not there ----------------------------------------------------------------
def test_sft_index_refuses_a_missing_image_root(sft_data, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(sft_index_argv(sft_data, out, "--image-root", str(tmp_path / "no_images"))) == 2
    line = one_error_line(capsys)
    assert "--image-root" in line and str(tmp_path / "no_images") in line
    assert not (out / "manifest.json").exists()  # refused before indexing
    assert main(sft_index_argv(sft_data, out, "--image-root", str(sft_data / "images"))) == 0


def test_a_missing_tokenizer_path_is_one_line_naming_key_and_path(tmp_path, capsys):
    world = make_caption_world(tmp_path / "captions", n=8, per_shard=8, n_mismatch=0, n_exact=0, n_near=0, n_corrupt=0)
    missing = tmp_path / "no" / "tokenizer"
    assert main(["pack", "--in", str(world["dir"]), "--out", str(tmp_path / "packed"), "--tokenizer", str(missing),
                 "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "tokenizer.path" in line and str(missing) in line and "no such folder" in line


def test_train_names_sft_index_when_it_points_nowhere(tmp_path, capsys):
    rc = main(["train", "--recipe", "tiny/sft", "--set", f"sft.index={tmp_path / 'no_index'}",
               "--set", f"train.init_from={tmp_path / 'no_ckpt'}", "--set", f"train.run_dir={tmp_path / 'run'}"])
    assert rc == 2
    line = one_error_line(capsys)
    assert f"sft.index: {tmp_path / 'no_index'} does not exist" in line
    assert "train.init_from" in line  # the other wrong key is named too
    assert not (tmp_path / "run").exists()


def test_train_names_sft_index_when_it_points_at_another_stage(tmp_path, capsys):
    other = tmp_path / "tok"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"stage": "tokenizer"}))
    rc = main(["train", "--recipe", "tiny/sft", "--set", f"sft.index={other}", "--set", "train.init_from=null",
               "--set", f"train.run_dir={tmp_path / 'run'}"])
    assert rc == 2
    line = one_error_line(capsys)
    assert "sft.index" in line and "'tokenizer'" in line


# -- output folders -------------------------------------------------------------------------
def _tokenizer_argv(tmp_path: Path, out: Path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        from fixtures_tokenizer import shape_sentences

        corpus.write_text("\n".join(shape_sentences(200)) + "\n")
    return ["tokenizer", "train", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "300"]


def test_unwritable_out_is_refused_naming_the_path(sft_data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for argv in (sft_index_argv(sft_data, blocker / "idx"), _tokenizer_argv(tmp_path, blocker / "tok"),
                 ["synth", "--out", str(blocker / "world"), "--quiet", "--set", "synth.num_captions=4"]):
        assert main(argv) == 2, argv
        line = one_error_line(capsys)
        assert f"--out {blocker}" in line and "cannot create the folder" in line, line
    assert main(sft_index_argv(sft_data, blocker)) == 2  # --out is an existing file
    assert "is a file, not a folder" in one_error_line(capsys)


def test_sft_index_refuses_a_non_empty_out_unless_overwrite(sft_data, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(sft_index_argv(sft_data, out)) == 0
    capsys.readouterr()
    before = (out / "manifest.json").read_bytes()
    assert main(sft_index_argv(sft_data, out)) == 2
    line = one_error_line(capsys)
    assert f"--out {out} exists and is not empty" in line and "--overwrite" in line
    assert (out / "manifest.json").read_bytes() == before  # untouched
    assert main(sft_index_argv(sft_data, out, "--overwrite")) == 0


def test_tokenizer_train_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(_tokenizer_argv(tmp_path, out)) == 0
    capsys.readouterr()
    before = (out / "tokenizer.json").read_bytes()
    assert main(_tokenizer_argv(tmp_path, out)) == 2
    assert "exists and is not empty" in one_error_line(capsys)
    assert (out / "tokenizer.json").read_bytes() == before
    assert main(_tokenizer_argv(tmp_path, out) + ["--overwrite"]) == 0


def test_eval_refuses_a_non_empty_out_before_loading_the_model(tmp_path, capsys):
    world = make_eval_world(tmp_path / "world", n=2)
    ckpt = tmp_path / "ckpt"  # never loaded: the refusal comes first
    ckpt.mkdir()
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["eval", "--ckpt", str(ckpt), "--tasks", "synth-vqa", "--synth-dir", str(world), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"--out {out} exists and is not empty" in line
    assert (out / "results.json").read_text() == "{}"


def test_vision_pretrain_refuses_a_non_empty_out(tmp_path, capsys):
    out = tmp_path / "tower"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"keep me")
    assert main(["vision-pretrain", "--data", str(tmp_path / "objects.jsonl"), "--out", str(out)]) == 2
    assert "exists and is not empty" in one_error_line(capsys)
    assert (out / "model.safetensors").read_bytes() == b"keep me"


def test_curate_resumes_in_a_non_empty_out_but_refuses_a_file(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    world = make_caption_world(tmp_path / "captions", n=8, per_shard=8, n_mismatch=0, n_exact=0, n_near=0, n_corrupt=0)
    assert main(["curate", "dedup", "--in", str(world["dir"]), "--out", str(blocker)]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)



def test_train_refuses_a_run_dir_that_is_a_file_or_cannot_be_made(tmp_path, tiny_tokenizer_dir, capsys):
    import random

    from fixtures_train import pack_captions, write_caption_shards

    captions = write_caption_shards(tmp_path / "captions", random.Random(0), n=8)
    packed = pack_captions(captions, tmp_path / "packed", str(tiny_tokenizer_dir))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for run_dir, why in ((blocker, "is a file, not a folder"), (blocker / "run", "cannot create the folder")):
        rc = main(["train", "--recipe", "tiny/pretrain", "--set", f"train.data_path={packed}",
                   "--set", f"train.run_dir={run_dir}", "--set", "train.max_steps=1", "--set", "train.report=false",
                   "--set", "train.progress_bar=false", "--set", "train.tensorboard=false"])
        assert rc == 2, run_dir
        line = one_error_line(capsys)
        assert f"train.run_dir {run_dir}" in line and why in line, line
    assert blocker.read_text() == "x"

# -- wrong file types, empty input ------------------------------------------------------------
def test_sft_index_refuses_input_without_a_usable_record(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("these are not LLaVA records\n")
    assert main(["sft-index", "--input", str(bad), "--out", str(tmp_path / "idx"), "--lengths", "estimate",
                 "--visual-tokens", "4"]) == 2
    line = one_error_line(capsys)
    assert str(bad) in line and "no usable record" in line


def test_curate_refuses_a_file_that_is_not_a_tar(tmp_path, capsys):
    bad = tmp_path / "captions.json"
    bad.write_text("[]")
    assert main(["curate", "dedup", "--in", str(bad), "--out", str(tmp_path / "d")]) == 2
    line = one_error_line(capsys)
    assert str(bad) in line and "not a .tar shard" in line
