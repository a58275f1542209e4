"""The small training loops (vision-pretrain, curate train-filter) stop at a step whose loss or
gradient norm is not finite, like the main trainer: one line naming the step and the value, exit 2,
nothing saved. The NaN is injected at a chosen step by wrapping the model's forward."""

from __future__ import annotations

import pytest
import torch
from fixtures_curate import make_world

from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.train.finite import NonFiniteStepError, require_finite
from vlmforge.train.loop import NonFiniteStepError as LoopNonFiniteStepError

WORLD = ["synth.image_size=72", "synth.num_captions=20", "synth.samples_per_shard=20", "synth.num_sft=4",
         "synth.num_mcq=4", "synth.num_vqa=5", "synth.num_pope_images=2", "synth.num_preference=0",
         "synth.num_text=10", "synth.num_vision=40"]


def error_line(capsys) -> str:
    """The one `vlmforge CMD: error: ...` line, without a traceback of the error. (transformers'
    logging handler may print "--- Logging error ---" with a traceback of its own when its stream
    is a capture closed by an earlier test: not ours, so not counted.)"""
    err = capsys.readouterr().err
    assert "NonFiniteStepError" not in err and "vlmforge/train/finite.py" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("vlmforge ") and ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def test_require_finite_names_step_and_value():
    assert NonFiniteStepError is LoopNonFiniteStepError  # the main trainer raises the same error
    require_finite(1, "loss", torch.tensor(0.5))
    require_finite(1, "gradient norm", 3.0)
    with pytest.raises(NonFiniteStepError, match=r"^step 4: the gradient norm is inf; "):
        require_finite(4, "gradient norm", torch.tensor(float("inf")))
    with pytest.raises(NonFiniteStepError, match=r"^step 2: the loss is nan; .*; lower x$"):
        require_finite(2, "loss", float("nan"), hint="lower x")


def test_vision_pretrain_stops_at_the_nan_step(tmp_path, monkeypatch, capsys):
    import vlmforge.vision.pretrain as vp
    from vlmforge.synth.writer import generate_world

    generate_world(load_recipe(None, WORLD), tmp_path / "world")
    calls = {"n": 0}
    real = vp.patch_features

    def poisoned(tower, pix, layer):
        calls["n"] += 1
        out = real(tower, pix, layer)
        return out * float("nan") if calls["n"] == 3 else out  # the 3rd training step (epoch 1 has 4)

    monkeypatch.setattr(vp, "patch_features", poisoned)
    out = tmp_path / "tower"
    assert main(["vision-pretrain", "--data", str(tmp_path / "world" / "vision"), "--out", str(out), "--epochs", "2",
                 "--no-progress", "--set", "vision_pretrain.batch_size=8"]) == 2
    line = error_line(capsys)
    assert "step 3: the loss is nan; stopped without updating or saving the weights" in line, line
    assert "vision_pretrain.lr" in line
    assert calls["n"] == 3  # stopped there: no further step, no held-out evaluation
    assert not any(out.iterdir())  # nothing saved


def test_train_filter_stops_at_the_nan_step(tmp_path, monkeypatch, capsys):
    import vlmforge.curate.train_filter as tfm

    world = make_world(tmp_path / "w", n=24, per_shard=12, n_mismatch=0, n_exact=0, n_near=0, n_corrupt=0)
    calls = {"n": 0}
    real_build = tfm.build_model

    def build_poisoned(tf, tokenizer):
        model = real_build(tf, tokenizer)
        forward = model.forward

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            if kwargs.get("return_loss"):
                calls["n"] += 1
                if calls["n"] == 2:  # the 2nd training step
                    out.loss = out.loss * float("nan")
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(tfm, "build_model", build_poisoned)
    out = tmp_path / "dfn"
    assert main(["curate", "train-filter", "--in", str(world["dir"]), "--out", str(out), "--epochs", "2",
                 "--device", "cpu", "--set", "curate.train_filter.batch_size=8",
                 "--set", "curate.train_filter.holdout_frac=0.2"]) == 2
    line = error_line(capsys)
    assert "step 2: the loss is nan; stopped without updating or saving the weights" in line, line
    assert "curate.train_filter.lr" in line
    assert calls["n"] == 2
    for f in ("model.safetensors", "calibration.json", "manifest.json"):
        assert not (out / f).exists(), f
