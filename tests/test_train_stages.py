"""`vlmforge train` end to end on real files: caption shards -> pack -> pretrain -> SFT from the
pretraining checkpoint. Also: impossible recipes fail before training with a clear message."""

import json
import random

import pytest
import torch
from fixtures_train import index_sft, one_torch_thread, pack_captions, write_caption_shards, write_sft_json

from vlmforge.cli import main

FAST = ["train.progress_bar=false", "train.tensorboard=false", "train.micro_batch_size=2", "train.global_batch_size=4"]

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("stage_data")
    rng = random.Random(0)
    write_caption_shards(root / "captions", rng)
    images = write_sft_json(root, rng)
    tok = str(tiny_tokenizer_dir)
    pack_captions(root / "captions", root / "packed", tok)
    index_sft(root, images, tok)
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
        (["train.stage=dpo"], "train.stage must be one of"),
        (["train.stage=mpo"], "MPO reads its pairs from preference.index"),
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
