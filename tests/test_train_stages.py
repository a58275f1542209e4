"""`vlmforge train` end to end on real files: caption shards -> pack -> pretrain -> SFT from the
pretraining checkpoint. Also: impossible recipes fail before training with a clear message."""

import io
import json
import random

import pytest
import torch
from PIL import Image

from vlmforge.cli import main

FAST = ["train.progress_bar=false", "train.tensorboard=false", "train.micro_batch_size=2", "train.global_batch_size=4"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a shared CPU
    yield
    torch.set_num_threads(old)


def _png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer_dir):
    from vlmforge.shards import ShardWriter

    root = tmp_path_factory.mktemp("stage_data")
    rng = random.Random(0)
    w = ShardWriter(str(root / "captions"), samples_per_shard=16)
    for i in range(24):
        c = rng.choice(sorted(COLOURS))
        w.write(f"{i:05d}", _png(c), f"A {c} square on a plain background.", {"uid": f"u{i}"})
    w.close()
    images = root / "images"
    images.mkdir()
    records = []
    for i in range(12):
        c = rng.choice(sorted(COLOURS))
        Image.new("RGB", (64, 64), COLOURS[c]).save(images / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": f"The square is {c}."}]})
    (root / "sft.json").write_text(json.dumps(records))
    tok = str(tiny_tokenizer_dir)
    assert main(["pack", "--recipe", "tiny/pretrain", "--in", str(root / "captions"), "--out", str(root / "packed"),
                 "--tokenizer", tok, "--no-progress", "--set", "pack.max_len=96"]) == 0
    assert main(["sft-index", "--recipe", "tiny/sft", "--input", str(root / "sft.json"), "--out", str(root / "index"),
                 "--image-root", str(images), "--tokenizer", tok, "--set", "sft.index_workers=1"]) == 0
    return root


def test_pretrain_then_sft_loads_exactly_the_saved_weights(data, tmp_path):
    from safetensors.torch import load_file

    from vlmforge.config import load_recipe
    from vlmforge.files import read_metrics
    from vlmforge.train.stages import build_model

    pre = tmp_path / "pre"
    rc = main(["train", "--recipe", "tiny/pretrain", "--set", f"train.data_path={data / 'packed'}",
               "--set", f"train.run_dir={pre}", "--set", "train.max_steps=3", *sum((["--set", s] for s in FAST), [])])
    assert rc == 0
    for name in ("config.yaml", "metrics.jsonl", "manifest.json", "report.html", "plots/loss.png",
                 "final/model.safetensors", "final/config.yaml", "final/tokenizer", "checkpoints/latest"):
        assert (pre / name).exists(), name
    assert [r["step"] for r in read_metrics(pre)] == [1, 2, 3]
    manifest = json.loads((pre / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["counts"]["steps"] == 3

    sft = tmp_path / "sft"
    sft_args = ["--set", f"sft.index={data / 'index'}", "--set", f"train.init_from={pre}",
                "--set", f"train.run_dir={sft}", "--set", "train.max_steps=2", *sum((["--set", s] for s in FAST), [])]
    # the SFT model is exactly the weights the pretraining run saved (then pool size / freezing change)
    cfg = load_recipe("tiny/sft", [a for a in sft_args if a != "--set"])
    model, _ = build_model(cfg, seed=0)
    saved = load_file(str(pre / "final" / "model.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    assert model.tokens_per_image == 64  # SFT runs the pretrained projector at full resolution
    assert main(["train", "--recipe", "tiny/sft", *sft_args]) == 0
    assert (sft / "final" / "model.safetensors").is_file()
    assert json.loads((sft / "manifest.json").read_text())["inputs"]["init_from"] == str((pre / "final").resolve())
    assert len(read_metrics(sft)) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.init_from=/nonexistent/ckpt"], "train.init_from: /nonexistent/ckpt does not exist"),
        (["train.data_path=/nonexistent/packed"], "train.data_path: /nonexistent/packed does not exist"),
        (["train.global_batch_size=5"], "must be a multiple of train.micro_batch_size"),
        (["train.loss_reduction=mean"], "train.loss_reduction must be one of"),
        (["train.stage=mpo"], "train.stage must be one of"),
    ],
)
def test_impossible_recipe_fails_before_training(data, tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "never"
    args = ["train", "--recipe", "tiny/pretrain", "--set", f"train.data_path={data / 'packed'}",
            "--set", f"train.run_dir={run_dir}", *sum((["--set", s] for s in FAST + overrides), [])]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()  # nothing started


def test_sft_requires_an_existing_pretraining_checkpoint(data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["train", "--recipe", "tiny/sft", "--set", f"sft.index={data / 'index'}",
               "--set", f"train.init_from={tmp_path / 'empty'}", "--set", f"train.run_dir={tmp_path / 'x'}"])
    assert rc == 2
    assert "is not a vlmforge checkpoint" in capsys.readouterr().err
