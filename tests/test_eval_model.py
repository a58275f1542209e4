"""`vlmforge eval` in-process on a tiny randomly initialised checkpoint over a few synthetic items."""

from __future__ import annotations

import json

import pytest
from test_eval import make_world

from vlmforge.cli import main


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer_dir):
    from vlmforge.config import load_recipe
    from vlmforge.model.build import build_vlm
    from vlmforge.model.saving import save_vlm
    from vlmforge.text.tokenization import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = load_recipe(None)  # tiny-siglip + tiny-qwen2 presets
    model = build_vlm(cfg.model, tok, seed=0)
    return save_vlm(model, tok, cfg, tmp_path_factory.mktemp("ckpt") / "tiny")


def test_vlmforge_eval_on_tiny_checkpoint(tiny_ckpt, tmp_path):
    world = make_world(tmp_path / "world", n=4)
    out = tmp_path / "eval"
    rc = main([
        "eval", "--ckpt", str(tiny_ckpt), "--tasks", "synth-mcq,synth-vqa", "--synth-dir", str(world),
        "--limit", "2", "--shots", "0,1", "--seeds", "0", "--batch-size", "4", "--max-new-tokens", "3",
        "--out", str(out),
    ])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"synth-mcq", "synth-mcq@1shot", "synth-vqa", "synth-vqa@1shot"}
    mcq = results["tasks"]["synth-mcq"]
    assert mcq["counts"]["n"] == 8 and mcq["primary"] == "circular_accuracy"
    assert 0.0 <= mcq["metrics"]["circular_accuracy"] <= 1.0 and mcq["chance"]["accuracy"] == 0.25
    assert results["tasks"]["synth-vqa@1shot"]["seeds"] == [0]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 + 8 + 2 + 2
    assert all(isinstance(p["prediction"], str) for p in preds)
    assert {p["n_images"] for p in preds if p["shots"] == 1} == {2}
    assert (out / "config.yaml").is_file() and (out / "manifest.json").is_file()


def test_eval_errors_are_user_errors(tiny_ckpt, tmp_path, capsys):
    world = make_world(tmp_path / "world", n=2)
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--tasks", "synth-vqa"]) == 2
    assert "--synth-dir" in capsys.readouterr().err
    # POPE questions of one image cannot be each other's demonstrations: fail before generating
    rc = main(["eval", "--ckpt", str(tiny_ckpt), "--tasks", "synth-pope", "--synth-dir", str(world),
               "--limit", "2", "--shots", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and "1-shot needs 1 demonstrations" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path / "nope"), "--tasks", "synth"]) == 2


def test_batching_does_not_change_greedy_answers(tiny_ckpt, tmp_path):
    from vlmforge.eval import evaluate
    from vlmforge.model.saving import load_vlm

    world = make_world(tmp_path / "world", n=3)
    model, tok, _ = load_vlm(tiny_ckpt)
    runs = []
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}"
        evaluate(model, tok, "synth-vqa", synth_dir=world, batch_size=bs, max_new_tokens=4, out_dir=out, progress=False)
        runs.append([json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()])
    assert runs[0] == runs[1]
