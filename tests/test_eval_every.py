"""Live evaluation during training (train.eval_every): eval rows at the expected steps, the same
training run as without it, scores equal to `vlmforge eval` of the saved weights, the report's
scaling-curve plot; under torchrun (gloo, FSDP2) every rank evaluates an unsharded copy and the
ranks agree with one process.

Also a torchrun worker: ``python tests/test_eval_every.py RUN_DIR STEPS [eval]``."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fixtures_train import (
    build_tiny_vlm,
    index_sft,
    one_torch_thread,
    synthetic_loader,
    tiny_recipe,
    write_sft_json,
)

from vlmforge import dist as vdist
from vlmforge.errors import ConfigError
from vlmforge.files import read_metrics
from vlmforge.train.loop import Trainer

HERE = Path(__file__).parent
TASKS = "[synth-vqa,synth-pope]"

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer_dir):
    from test_eval import make_world

    root = tmp_path_factory.mktemp("eval_every")
    images = write_sft_json(root, random.Random(0), n=16)
    index_sft(root, images, tiny_tokenizer_dir)
    make_world(root / "world", n=4)
    return root


def _sft(data, tok, run, *extra):
    from vlmforge.cli import main

    sets = ["train.init_from=null", f"tokenizer.path={tok}", f"sft.index={data / 'index'}",
            f"train.run_dir={run}", "train.max_steps=5", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.progress_bar=false", "train.tensorboard=false", "train.checkpoint_every=0", "seed=3", *extra]
    return main(["train", "--recipe", "tiny/sft", *[a for s in sets for a in ("--set", s)]])


def _live(data):
    return ["train.eval_every=2", f"train.eval_tasks={TASKS}", f"eval.synth_dir={data / 'world'}",
            "train.eval_limit=3", "train.eval_max_new_tokens=3", "eval.batch_size=2"]


def test_sft_with_eval_every(data, tiny_tokenizer_dir, tmp_path):
    from vlmforge.cli import main

    assert _sft(data, tiny_tokenizer_dir, tmp_path / "plain") == 0
    assert _sft(data, tiny_tokenizer_dir, tmp_path / "live", *_live(data)) == 0
    plain, live = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "live")
    evals = [r for r in live if "samples_seen" in r]
    steps = [r for r in live if "loss" in r]
    # before the first step, every 2 steps, and after the last (5)
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    # the same training run, bit for bit
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in steps] == [(r["step"], r["loss"], r["grad_norm"]) for r in plain]
    assert all("samples_seen" not in r for r in plain)
    keys = {k for r in evals for k in r if k.startswith("eval/")}
    assert {"eval/synth-vqa/vqa_accuracy", "eval/synth-pope/f1", "eval/synth-pope/accuracy"} <= keys
    assert all(set(r) >= keys for r in evals)
    # samples seen: 0, then the conversations trained on so far (packed rows hold several)
    seen = [r["samples_seen"] for r in evals]
    manifest = json.loads((tmp_path / "live" / "manifest.json").read_text())
    assert seen[0] == 0 and seen == sorted(seen) and seen[-1] == manifest["counts"]["samples"]
    assert manifest["counts"]["samples"] >= manifest["counts"]["rows"] == 5 * 4
    # the last evaluation is `vlmforge eval` of the saved final weights
    out = tmp_path / "eval"
    assert main(["eval", "--ckpt", str(tmp_path / "live" / "final"), "--tasks", "synth-vqa,synth-pope",
                 "--synth-dir", str(data / "world"), "--limit", "3", "--max-new-tokens", "3", "--batch-size", "2",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["tasks"]
    for task, r in results.items():
        for metric, v in r["metrics"].items():
            if isinstance(v, (int, float)):
                assert evals[-1][f"eval/{task}/{metric}"] == pytest.approx(v, abs=1e-12), (task, metric)
    # the report plots each benchmark against samples seen
    html = (tmp_path / "live" / "report.html").read_text()
    assert (tmp_path / "live" / "plots" / "eval.png").is_file() and "Benchmarks vs samples seen" in html
    assert "last loss" in html and "Benchmarks" not in (tmp_path / "plain" / "report.html").read_text()


def test_eval_every_refuses_bad_tasks_before_writing(data, tiny_tokenizer_dir, tmp_path, capsys):
    run = tmp_path / "bad"
    assert _sft(data, tiny_tokenizer_dir, run, "train.eval_every=2") == 2
    assert "train.eval_tasks" in capsys.readouterr().err
    assert _sft(data, tiny_tokenizer_dir, run, "train.eval_every=2", "train.eval_tasks=[synth-vqa]") == 2
    err = capsys.readouterr().err
    assert "train.eval_tasks" in err and "--synth-dir" in err  # synth-vqa without eval.synth_dir
    assert not (run / "config.yaml").exists()


def _rng_draws():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def _noisy_hook(calls):
    """A hook that draws from every global generator and checks what the loop hands it."""
    def hook(model, step):
        assert not model.training and not torch.is_grad_enabled()
        assert not any(hasattr(p, "full_tensor") for p in model.parameters())  # never a sharded model
        calls.append(step)
        torch.randn(100), random.random(), np.random.rand(5)
        return {"probe/step": float(step)}
    return hook


def test_trainer_restores_random_state_and_train_mode(tmp_path):
    """The hook's draws do not reach the training run or the generators after it."""
    out = {}
    for name, hook in (("off", None), ("on", _noisy_hook(calls := []))):
        cfg = tiny_recipe(["train.max_steps=3", "train.eval_every=2", "train.progress_bar=false"])
        model = build_tiny_vlm(cfg, seed=0)
        torch.manual_seed(11), random.seed(11), np.random.seed(11)
        t = Trainer(cfg.train, model, synthetic_loader(cfg, model), total_steps=3, run_dir=tmp_path / name,
                    device=torch.device("cpu"), eval_hook=hook)
        res = t.fit()
        assert t.model.training
        out[name] = (res.losses, _rng_draws())
    assert out["on"] == out["off"] and calls == [0, 2, 3]
    rows = read_metrics(tmp_path / "on")
    assert [r["step"] for r in rows if "eval/probe/step" in r] == [0, 2, 3]
    assert [r["eval/probe/step"] for r in rows if "eval/probe/step" in r] == [0.0, 2.0, 3.0]


def test_eval_every_zero_never_calls_the_hook(tmp_path):
    cfg = tiny_recipe(["train.max_steps=2", "train.progress_bar=false"])
    model = build_tiny_vlm(cfg, seed=0)
    calls = []
    Trainer(cfg.train, model, synthetic_loader(cfg, model), total_steps=2, run_dir=tmp_path,
            device=torch.device("cpu"), eval_hook=_noisy_hook(calls)).fit()
    assert calls == [] and all("samples_seen" not in r for r in read_metrics(tmp_path))


def test_eval_points_spread_the_evaluations(tmp_path):
    from vlmforge.train.loop import eval_interval

    cfg = tiny_recipe(["train.eval_points=2", "train.eval_every=1", "train.progress_bar=false"])
    assert eval_interval(cfg.train, 5) == 3 and eval_interval(cfg.train, 1820) == 910
    assert eval_interval(tiny_recipe(["train.eval_points=6"]).train, 1820) == 304  # 0, 304, ..., 1520, 1820
    assert eval_interval(tiny_recipe(["train.eval_every=7"]).train, 100) == 7
    model = build_tiny_vlm(cfg, seed=0)
    calls = []
    Trainer(cfg.train, model, synthetic_loader(cfg, model), total_steps=5, run_dir=tmp_path,
            device=torch.device("cpu"), eval_hook=_noisy_hook(calls)).fit()
    assert calls == [0, 3, 5]


def test_demo_sft_recipe_evaluates_the_synth_benchmarks():
    from vlmforge.config import load_recipe

    cfg = load_recipe("demo/sft")
    assert cfg.train.eval_points == 6 and list(cfg.train.eval_tasks) == ["synth"] and cfg.train.eval_limit == 48
    assert cfg.eval.synth_dir is None  # the world folder: `vlmforge demo` sets it (demo/pipeline.py)


def test_config_keys_are_checked():
    from vlmforge.config import load_recipe

    with pytest.raises(ConfigError):
        load_recipe(None, ["train.eval_every=-1"])
    with pytest.raises(ConfigError):
        load_recipe(None, ["train.eval_limit=0"])
    cfg = load_recipe(None, ["train.eval_tasks=[synth-mcq,synth-vqa]"])
    assert list(cfg.train.eval_tasks) == ["synth-mcq", "synth-vqa"] and cfg.train.eval_every == 0


# ---------------------------------------------------------------- two ranks (gloo, FSDP2)

def _probe_hook(probe, calls):
    """Scores a fixed batch, with a different number of forward passes per rank (what the eval's
    split does; an FSDP-sharded model would hang here), then agrees over ranks."""
    def hook(model, step):
        assert not any(hasattr(p, "full_tensor") for p in model.parameters())
        for _ in range(vdist.rank() + 1):
            logits = model(**probe)
        calls.append(step)
        return {"probe/loss": float(torch.log_softmax(logits.double(), -1)[..., 7].mean())}
    return hook


def _probe_batch(cfg, model):
    b = synthetic_loader(cfg, model, rank=0, world=1).batch(999)
    return {k: b[k] for k in ("input_ids", "position_ids", "seq_ids", "pixel_values")}


def worker(argv):
    run, steps, live = argv[0], int(argv[1]), len(argv) > 2
    info = vdist.init_distributed("cpu")
    torch.set_num_threads(1)
    cfg = tiny_recipe([f"train.max_steps={steps}", "train.eval_every=2" if live else "train.eval_every=0"])
    model = build_tiny_vlm(cfg, seed=0)
    probe, calls, scores = _probe_batch(cfg, model), [], []
    hook = _probe_hook(probe, calls)

    def recording(model, step):
        s = hook(model, step)
        scores.append(s["probe/loss"])
        return s

    loader = synthetic_loader(cfg, model, rank=info.rank, world=info.world_size)
    res = Trainer(cfg.train, model, loader, total_steps=steps, run_dir=run, device=info.device,
                  eval_hook=recording if live else None).fit()
    Path(run, f"rank{info.rank}.json").write_text(json.dumps({"calls": calls, "scores": scores,
                                                               "losses": list(res.losses.values())}))
    vdist.cleanup()


def _torchrun():
    path = Path(sys.executable).with_name("torchrun")
    return str(path) if path.exists() else shutil.which("torchrun")


@pytest.mark.slow
@pytest.mark.skipif(_torchrun() is None, reason="torchrun not installed")
def test_two_ranks_evaluate_an_unsharded_copy(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([_torchrun(), "--standalone", "--nproc-per-node", "2", __file__, str(tmp_path / "two"), "4",
                          "eval"], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        worker([str(tmp_path / "one"), "4", "eval"])
    finally:
        torch.set_num_threads(threads)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert one["calls"] == r0["calls"] == r1["calls"] == [0, 2, 4]
    assert r0["scores"] == r1["scores"]  # both ranks evaluated the same full weights
    assert max(abs(a - b) for a, b in zip(one["scores"], r0["scores"])) <= 1e-5
    assert max(abs(a - b) for a, b in zip(one["losses"], r0["losses"])) <= 1e-5
    rows = read_metrics(tmp_path / "two")
    assert [r["step"] for r in rows if "samples_seen" in r] == [0, 2, 4]


if __name__ == "__main__":
    worker(sys.argv[1:])
