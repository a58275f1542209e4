"""Numbers a recipe or flag gets wrong fail before any work, naming key, value, allowed range and
source (file or --set); a training step whose loss or gradient norm is not finite stops the run at
that step (exit 2, the last good checkpoint kept, no final/), or is skipped and counted when
train.skip_nonfinite_steps is on."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_train import (
    build_tiny_vlm,
    one_torch_thread,
    pack_captions,
    synthetic_loader,
    tiny_recipe,
    write_caption_shards,
)
from nonfinite_worker import poison_at

from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.config.loader import BUILTIN_DIR
from vlmforge.config.ranges import range_violations
from vlmforge.errors import ConfigError, UserError
from vlmforge.files import read_metrics
from vlmforge.train.checkpoint import latest_checkpoint
from vlmforge.train.loop import NonFiniteStepError, Trainer

HERE = Path(__file__).parent

# (key, bad value as typed, allowed range as the message states it, the value as the message shows it)
BAD = [
    ("train.lr", "nan", "> 0 and finite", "nan"),
    ("train.lr", "-1", "> 0 and finite", "-1.0"),
    ("train.lr", "inf", "> 0 and finite", "inf"),
    ("train.projector_lr", "0", "> 0 and finite", "0.0"),
    ("train.checkpoint_every", "-1", ">= 0", "-1"),
    ("train.keep_last", "0", ">= 1", "0"),
    ("train.warmup_ratio", "1.5", "in [0, 1]", "1.5"),
    ("train.adam_beta2", "1.0", "in [0, 1)", "1.0"),
    ("synth.faults.mismatch_frac", "1.5", "in [0, 1]", "1.5"),
    ("curate.train_filter.calibrate_keep", "1.5", "in [0, 1]", "1.5"),
    ("train.micro_batch_size", "0", ">= 1", "0"),
    ("eval.batch_size", "0", ">= 1", "0"),
    ("pack.max_len", "0", ">= 1", "0"),
]


def _yaml_of(key: str, value: str) -> str:
    *sections, name = key.split(".")
    lines = [f"{'  ' * i}{s}:" for i, s in enumerate(sections)]
    return "\n".join(lines + [f"{'  ' * len(sections)}{name}: {value}"]) + "\n"


@pytest.mark.parametrize("key, value, allowed, shown", BAD, ids=[f"{k}={v}" for k, v, _, _ in BAD])
def test_bad_number_via_set_names_key_value_range_and_flag(key, value, allowed, shown):
    with pytest.raises(ConfigError) as e:
        load_recipe("tiny/pretrain", [f"{key}={value}"])
    assert str(e.value) == f"--set {key}={value}: {key} must be {allowed}, got {shown}"


@pytest.mark.parametrize("key, value, allowed, shown", BAD, ids=[f"{k}={v}" for k, v, _, _ in BAD])
def test_bad_number_in_a_recipe_file_names_the_file(tmp_path, key, value, allowed, shown):
    # YAML spells NaN / infinity .nan / .inf
    yaml_value = {"nan": ".nan", "inf": ".inf"}.get(value, value)
    r = tmp_path / "bad.yaml"
    r.write_text("base: tiny/pretrain\n" + _yaml_of(key, yaml_value))
    with pytest.raises(ConfigError) as e:
        load_recipe(r)
    assert str(e.value) == f"{r}: {key} must be {allowed}, got {shown}"


def test_the_file_that_brought_the_bad_value_is_named(tmp_path):
    """A base file's bad value names the base file, not the recipe that names it as base."""
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  keep_last: 0\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=f"^{base}: train.keep_last must be >= 1, got 0$"):
        load_recipe(child)


def test_elements_of_lists_and_dicts_are_checked():
    with pytest.raises(ConfigError, match=r"eval.shots\[1\] must be >= 0, got -2"):
        load_recipe(None, ["eval.shots=[0,-2]"])
    with pytest.raises(ConfigError, match="synth.caption_mix.short must be >= 0 and finite, got -1.0"):
        load_recipe(None, ["synth.caption_mix.short=-1"])


@pytest.mark.parametrize("overrides", [
    ["train.lr=1e-12", "train.warmup_ratio=0", "train.min_lr_ratio=1", "train.keep_last=1",
     "train.checkpoint_every=0", "train.max_steps=0", "train.grad_clip=0", "train.adam_beta1=0"],
    ["train.warmup_ratio=1", "synth.faults.mismatch_frac=0", "synth.faults.rgba_frac=1.0",
     "train.projector_lr=null", "model.projector.pool_size=null", "eval.limit=null", "eval.shots=[0,8]"],
    ["train.micro_batch_size=1", "train.global_batch_size=1", "curate.dedup.near.embedding_min_cosine=-1",
     "curate.dedup.near.phash_max_distance=64", "synth.max_objects=9", "synth.jpeg_quality=100"],
], ids=["lower-edges", "upper-edges-and-unset", "more-edges"])
def test_edge_values_pass(overrides):
    load_recipe("tiny/pretrain", overrides)


@pytest.mark.parametrize("path", sorted(BUILTIN_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(BUILTIN_DIR)))
def test_every_builtin_recipe_is_in_range(path):
    assert list(range_violations(load_recipe(path))) == []


def test_cli_refuses_before_any_work(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["synth", "--out", str(out), "--quiet", "--set", "synth.faults.cmyk_frac=1.5"]) == 2
    err = capsys.readouterr().err
    assert "synth.faults.cmyk_frac must be in [0, 1], got 1.5" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["vision-pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "v"), "--epochs", "0"]) == 2
    assert "--epochs: vision_pretrain.epochs must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------- non-finite training steps


_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


def _trainer(run_dir: Path, poison_step: int | None, what: str = "loss", extra=(), steps: int = 5):
    cfg = tiny_recipe([f"train.max_steps={steps}", "train.checkpoint_every=1", "train.keep_last=2", *extra])
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    model = poison_at(build_tiny_vlm(cfg), accum, poison_step, what)

    def export(m, out):
        out.mkdir(parents=True)
        (out / "done").write_text("ok")

    trainer = Trainer(cfg.train, model, synthetic_loader(cfg, model), steps, run_dir, torch.device("cpu"),
                      export_fn=export)
    return trainer, model


@pytest.mark.parametrize("what, named", [("loss", "the loss is nan"), ("grad", "the gradient norm is ")])
def test_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, what, named):
    run = tmp_path / "run"
    trainer, model = _trainer(run, poison_step=3, what=what)
    with pytest.raises(NonFiniteStepError) as e:
        trainer.fit()
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg  # the CLI prints it as one line, exit 2
    assert msg.startswith(f"step 3: {named}") and "step_00000002, the last good checkpoint" in msg
    assert "train.skip_nonfinite_steps=true" in msg
    assert latest_checkpoint(run / "checkpoints").name == "step_00000002"
    assert not (run / "checkpoints" / "step_00000003").exists()
    assert not (run / "final").exists()
    assert trainer.step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())  # step 3 applied no update
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["nonfinite"] == ("loss" if what == "loss" else "grad_norm")
    if what == "grad":
        assert math.isfinite(rows[-1]["loss"]) and not math.isfinite(rows[-1]["grad_norm"])

    # nothing lost: the same run without the fault resumes from step 2 and finishes
    again, _ = _trainer(run, poison_step=None)
    result = again.fit()
    assert (result.start_step, result.final_step) == (2, 5)
    assert (run / "final" / "done").is_file()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_skip_option_skips_the_update_counts_it_and_finishes(tmp_path):
    run = tmp_path / "skip"
    trainer, model = _trainer(run, poison_step=3, extra=["train.skip_nonfinite_steps=true"])
    before = {}

    # the weights after step 2 equal those after step 3 (no update at the skipped step)
    orig_step = trainer.train_step

    def spy():
        if trainer.step == 2:
            before.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        row = orig_step()
        if trainer.step == 3:
            assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        return row

    trainer.train_step = spy
    result = trainer.fit()
    assert result.final_step == 5 and before
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert rows[2]["nonfinite"] == "loss" and all("nonfinite" not in r for r in rows[3:])
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] != 3)
    assert trainer.counters["skipped_steps"] == 1
    assert (run / "final" / "done").is_file()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_option_is_off_by_default():
    assert load_recipe(None).train.skip_nonfinite_steps is False


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_two_ranks_stop_together_when_one_rank_sees_nan(tmp_path):
    """NaN injected on rank 1 only at step 3: both ranks stop at step 3 (no hang, no rank going on),
    exit non-zero, checkpoints/latest stays step 2."""
    run = tmp_path / "two"
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(HERE / "nonfinite_worker.py"), str(run), "5", "3",
         "1", "--set", "train.checkpoint_every=1"],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: error: step 3: the loss is nan" in proc.stderr, proc.stderr[-3000:]
    assert latest_checkpoint(run / "checkpoints").name == "step_00000002"
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("numbers_data")
    write_caption_shards(root / "captions", random.Random(0), colours=["red", "green", "blue"])
    return pack_captions(root / "captions", root / "packed", str(tiny_tokenizer_dir))


def _train_args(packed: Path, run: Path, *sets: str) -> list[str]:
    base = [f"train.data_path={packed}", f"train.run_dir={run}", "train.max_steps=4", "train.progress_bar=false",
            "train.tensorboard=false", "train.report=false", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.checkpoint_every=1", *sets]
    return ["train", "--recipe", "tiny/pretrain", *sum((["--set", s] for s in base), [])]


def test_train_command_with_nan_lr_fails_before_any_work(packed, tmp_path, capsys):
    run = tmp_path / "nan"
    assert main(_train_args(packed, run, "train.lr=nan")) == 2
    err = capsys.readouterr().err
    assert "train.lr must be > 0 and finite, got nan" in err and "--set" in err and "Traceback" not in err
    assert not run.exists()


def test_train_command_that_diverges_exits_2_and_writes_no_final(packed, tmp_path, capsys):
    """lr 1e10: step 1's update blows the weights up, step 2's loss is NaN."""
    run = tmp_path / "diverge"
    assert main(_train_args(packed, run, "train.lr=1e10", "train.warmup_steps=0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("vlmforge train: error: step 2: the loss is nan;"), err[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (run / "final").exists() and not (run / "manifest.json").exists()
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1].replace("NaN", "null"))["nonfinite"] == "loss"
