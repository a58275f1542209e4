"""The training loop on the real tiny VLM with synthetic packed batches: accumulation and
activation checkpointing do not change the update, freezing holds, kill-and-resume is exact,
checkpoints rotate, and the run folder has its metrics and report."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_train import build_tiny_vlm, one_torch_thread, synthetic_loader, tiny_recipe

from vlmforge.files import read_metrics
from vlmforge.train.loop import KILL_ENV, Trainer

HERE = Path(__file__).parent


def _fit(tmp_path, name, overrides, steps=3, model=None):
    cfg = tiny_recipe([f"train.max_steps={steps}", *overrides])
    model = model if model is not None else build_tiny_vlm(cfg)
    trainer = Trainer(cfg.train, model, synthetic_loader(cfg, model), steps, tmp_path / name, torch.device("cpu"))
    return trainer.fit(), trainer


_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


def test_accumulation_split_gives_same_update(tmp_path):
    """Global batch 4 as 2 micro-batches of 2 or as 1 of 4: same losses (sample reduction)."""
    a, _ = _fit(tmp_path, "a", ["train.micro_batch_size=2", "train.loss_reduction=sample"])
    b, _ = _fit(tmp_path, "b", ["train.micro_batch_size=4", "train.loss_reduction=sample"])
    assert len(a.losses) == 3
    for s in a.losses:
        assert a.losses[s] == pytest.approx(b.losses[s], abs=1e-5)


def test_activation_checkpointing_same_losses(tmp_path):
    a, _ = _fit(tmp_path, "a", [], steps=2)
    b, _ = _fit(tmp_path, "b", ["train.activation_checkpointing=true"], steps=2)
    for s in a.losses:
        assert a.losses[s] == pytest.approx(b.losses[s], abs=1e-6)


def test_frozen_unchanged_trainable_changed(tmp_path):
    cfg = tiny_recipe(["model.llm.frozen=true"])  # only the projector trains (vision frozen by default)
    model = build_tiny_vlm(cfg)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _, trainer = _fit(tmp_path, "f", ["model.llm.frozen=true"], steps=2, model=model)
    after = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)
    for k, v in after.items():
        if k in trainable:
            assert not torch.equal(v, before[k]), f"{k} did not change"
        else:
            assert torch.equal(v, before[k]), f"frozen {k} changed"
    names = {g["component"] for g in trainer.optimizer.param_groups}
    assert names == {"projector"}


def test_run_folder_metrics_checkpoints(tmp_path):
    res, _ = _fit(tmp_path, "r", ["train.checkpoint_every=1", "train.keep_last=2", "train.report=true"], steps=3)
    run = tmp_path / "r"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lr/llm", "lr/projector", "grad_norm", "tokens_per_s", "real_token_fraction", "step_time", "data_wait"):
        assert key in rows[0], key
    assert 0 < rows[0]["real_token_fraction"] < 1
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000002", "step_00000003"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    files = os.listdir(run / "checkpoints" / "step_00000003")
    assert "trainer_state.json" in files and "rank_00000.json" in files
    assert not any(f.endswith((".pt", ".pkl", ".distcp", ".metadata")) for f in files)  # no pickle


def _worker(root, steps, extra=(), env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, str(HERE / "train_worker.py"), str(root), str(steps), "sample", *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_kill_and_resume_is_bit_identical(tmp_path, capsys, optimizer):
    """A process SIGKILLed after step 5 (checkpoint at 4) and the same run started again give the
    per-step losses of an uninterrupted run, bit for bit. (train_worker.py builds exactly what
    _fit builds: same recipe, model seed, data and thread count.) With Muon the checkpoint holds
    both optimizers' state and both schedules."""
    steps, extra = 7, ["train.checkpoint_every=2", f"train.optimizer={optimizer}"]
    killed = _worker(tmp_path / "run", steps, extra, {KILL_ENV: "5"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "sample")] == [1, 2, 3, 4, 5]
    overrides = ["train.loss_reduction=sample", *extra]
    resumed, _ = _fit(tmp_path / "run", "sample", overrides, steps=steps)
    assert "step_00000004" in capsys.readouterr().out and resumed.start_step == 4
    _fit(tmp_path, "ref", overrides, steps=steps)
    a = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "ref")]
    b = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "run" / "sample")]
    assert a == b  # exact equality, steps 1..7, no duplicated steps
