"""Bad input to `vlmforge train`: a rerun of a run folder with other settings, and data, checkpoint
and tokenizer that do not belong together. Each is refused before anything is written, naming what
differs; an unchanged rerun still resumes, and train.resume=false starts the run over cleanly."""

import hashlib
import json
import random
import shutil

import pytest
from fixtures_tokenizer import shape_sentences
from fixtures_train import index_sft, one_torch_thread, pack_captions, write_caption_shards, write_sft_json

from vlmforge.cli import main

FAST = ["train.progress_bar=false", "train.tensorboard=false", "train.report=false", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.max_steps=0", "train.epochs=1", "train.checkpoint_every=1",
        "train.keep_last=5"]
SFT_BATCH = ["train.micro_batch_size=1", "train.global_batch_size=1"]  # the tiny index makes few SFT rows

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


def _sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer_dir):
    """Caption shards packed twice (two different packings) and an SFT index, all with tokenizer A
    (tiny_tokenizer_dir); tokenizer B has a smaller vocabulary."""
    from vlmforge.text.tokenization import train_tokenizer

    root = tmp_path_factory.mktemp("resume_data")
    rng = random.Random(0)
    write_caption_shards(root / "captions", rng)
    images = write_sft_json(root, rng)
    train_tokenizer(shape_sentences(), root / "tok_b", vocab_size=300, min_frequency=2)
    tok = str(tiny_tokenizer_dir)
    for name, max_len in (("packed", 96), ("packed2", 128)):
        pack_captions(root / "captions", root / name, tok, max_len)
    index_sft(root, images, tok)
    return root


def _pretrain(data, run_dir, extra=(), data_path=None, tok=None):
    sets = [f"train.data_path={data_path or data / 'packed'}", f"train.run_dir={run_dir}", *FAST, *extra]
    if tok is not None:
        sets.append(f"tokenizer.path={tok}")
    return main(["train", "--recipe", "tiny/pretrain", *_sets(sets)])


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory):
    """A finished pretraining run (one epoch, a checkpoint every step)."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert _pretrain(data, run) == 0
    assert (run / "checkpoints" / "latest").is_file()
    return run


def test_a_run_folder_records_the_settings_that_define_its_run(base_run, tiny_tokenizer_dir):
    run = json.loads((base_run / "run.json").read_text())
    s = run["settings"]
    assert s["train.lr"] == 0.001 and s["train.epochs"] == 1.0 and s["train.optimizer"] == "adamw"
    assert s["train.global_batch_size"] == 4 and s["seed"] == 0 and s["world_size"] == 1
    assert len(s["data.fingerprint"]) == 64 and len(s["tokenizer.sha256"]) == 64
    assert "train.log_every" not in s and "train.run_dir" not in s and "train.data_path" not in s
    assert run["info"]["tokenizer"] == str(tiny_tokenizer_dir)


def _snapshot(folder):
    """{relative path: (sha256 of the bytes, mtime_ns)} of every file under folder."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)  # copy2: bytes and mtimes
    return dst


# -- point 3: a rerun with other settings is refused before anything changes -------------------


@pytest.mark.parametrize("extra, expected", [
    (["train.lr=2e-3"], ["train.lr: 0.001 -> 0.002"]),
    (["train.epochs=2"], ["train.epochs: 1.0 -> 2.0"]),
    (["train.optimizer=muon"], ['train.optimizer: "adamw" -> "muon"']),
    (["train.lr=2e-3", "train.epochs=3", "train.global_batch_size=8"],
     ["train.lr: 0.001 -> 0.002", "train.epochs: 1.0 -> 3.0", "train.global_batch_size: 4 -> 8"]),
    (["model.projector.hidden_size=32"], ["model.projector.hidden_size: null -> 32"]),
])
def test_resume_with_changed_settings_is_refused_before_anything_changes(base_run, data, tmp_path, capsys,
                                                                        extra, expected):
    run = _copy(base_run, tmp_path)
    before = _snapshot(run)
    capsys.readouterr()
    assert _pretrain(data, run, extra) == 2
    err = capsys.readouterr().err
    for line in expected:
        assert f"\n  {line}" in err, err
    assert f"({len(expected)} changed" in err
    assert "--set train.resume=false" in err and "--set train.run_dir=NEW_FOLDER" in err
    assert "Traceback" not in err
    assert _snapshot(run) == before  # config.yaml, run.json, checkpoints, metrics: not touched


def test_resume_on_other_data_is_refused(base_run, data, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    before = _snapshot(run)
    capsys.readouterr()
    assert _pretrain(data, run, data_path=data / "packed2") == 2
    err = capsys.readouterr().err
    assert "\n  data.fingerprint: " in err and "(1 changed" in err
    assert _snapshot(run) == before


def test_unchanged_rerun_resumes_and_harmless_settings_may_change(base_run, data, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    run_json = (run / "run.json").read_bytes()
    steps = json.loads((run / "manifest.json").read_text())["counts"]["steps"]
    capsys.readouterr()
    # logging, checkpoint frequency and the data folder's location are not part of the run
    moved = tmp_path / "moved_packed"
    shutil.copytree(data / "packed", moved)
    assert _pretrain(data, run, ["train.log_every=5", "train.checkpoint_every=0", "train.keep_last=1"],
                     data_path=moved) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / f'step_{steps:08d}'} at step {steps}" in out
    assert (run / "run.json").read_bytes() == run_json


def test_resume_false_starts_the_run_over_in_the_same_folder(base_run, data, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    (run / "notes.txt").write_text("mine")  # not a run output: left alone
    capsys.readouterr()
    assert _pretrain(data, run, ["train.resume=false", "train.lr=2e-3", "train.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "train.resume=false: starting over in" in out and "resumed" not in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((run / "run.json").read_text())["settings"]["train.lr"] == 0.002
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    assert (run / "notes.txt").read_text() == "mine"


def test_run_folder_from_before_run_json_resumes_with_a_warning(base_run, data, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    (run / "run.json").unlink()
    with pytest.warns(UserWarning, match="has no run.json"):
        assert _pretrain(data, run) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (run / "run.json").is_file()  # recorded from now on


# -- point 4: one tokenizer per pipeline ------------------------------------------------------


def test_pack_and_sft_index_record_the_tokenizer_fingerprint(data, tiny_tokenizer_dir):
    from vlmforge.text.tokenization import load_tokenizer, tokenizer_fingerprint

    fp = tokenizer_fingerprint(load_tokenizer(tiny_tokenizer_dir))
    assert json.loads((data / "packed" / "manifest.json").read_text())["geometry"]["tokenizer_fingerprint"] == fp
    index = json.loads((data / "index" / "manifest.json").read_text())
    assert index["tokenizer_fingerprint"] == fp and index["tokenizer"] == str(tiny_tokenizer_dir)
    b = tokenizer_fingerprint(load_tokenizer(data / "tok_b"))
    assert b["sha256"] != fp["sha256"] and b["len"] < fp["len"]


def test_fingerprint_survives_a_save_and_load(tiny_tokenizer_dir, tmp_path):
    from vlmforge.text.tokenization import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.save_pretrained(str(tmp_path / "copy"))
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "copy")) == tokenizer_fingerprint(tok)


def test_pretrain_with_another_tokenizer_than_the_pack_is_refused(data, tmp_path, capsys, tiny_tokenizer_dir):
    run = tmp_path / "run"
    assert _pretrain(data, run, tok=data / "tok_b") == 2
    err = capsys.readouterr().err
    assert f"{data / 'packed'} was made with tokenizer {tiny_tokenizer_dir} (sha256 " in err
    assert f"this run trains with {data / 'tok_b'} (sha256 " in err
    assert "Traceback" not in err and not run.exists()


def test_sft_with_another_tokenizer_than_the_index_is_refused(data, tmp_path, capsys, tiny_tokenizer_dir):
    run = tmp_path / "run"
    rc = main(["train", "--recipe", "tiny/sft", *_sets([
        f"sft.index={data / 'index'}", "train.init_from=null", f"tokenizer.path={data / 'tok_b'}",
        f"train.run_dir={run}", *FAST, *SFT_BATCH])])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{data / 'index'} was made with tokenizer {tiny_tokenizer_dir} (sha256 " in err
    assert f"{data / 'tok_b'} (sha256 " in err and not run.exists()


def test_init_from_checkpoint_with_another_tokenizer_is_refused(base_run, data, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--recipe", "tiny/sft", *_sets([
        f"sft.index={data / 'index'}", f"train.init_from={base_run}", f"tokenizer.path={data / 'tok_b'}",
        f"train.run_dir={run}", *FAST, *SFT_BATCH])])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"tokenizer.path {data / 'tok_b'} (sha256 " in err
    assert f"is not the tokenizer of train.init_from {base_run / 'final' / 'tokenizer'} (sha256 " in err
    assert not run.exists()


def test_data_folder_without_a_fingerprint_is_used_after_one_warning(data, tmp_path, tiny_tokenizer_dir):
    from vlmforge.config import load_recipe
    from vlmforge.train.stages import run_fingerprints

    old = tmp_path / "old_packed"
    shutil.copytree(data / "packed", old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["geometry"]["tokenizer_fingerprint"]  # as an older `vlmforge pack` wrote it
    (old / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_recipe("tiny/pretrain", [f"train.data_path={old}", f"tokenizer.path={tiny_tokenizer_dir}"])
    with pytest.warns(UserWarning, match="records no tokenizer fingerprint") as caught:
        run_fingerprints(cfg)
        run_fingerprints(cfg)
    assert len([w for w in caught if "fingerprint" in str(w.message)]) == 1  # once
