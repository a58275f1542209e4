"""`vlmforge preference build` end to end on the tiny checkpoint: valid MMPR jsonl, seeded samples."""

from __future__ import annotations

import json

import pytest
from fixtures_model import tiny_checkpoint
from PIL import Image
from test_preference_build import make_questions

from vlmforge.cli import main
from vlmforge.preference.build import read_pairs
from vlmforge.preference.sampler import ModelSampler, SampleRequest


@pytest.fixture(autouse=True)
def one_thread():
    """A 64-wide model: one thread beats several contending for a shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("pref"))


def test_end_to_end_on_the_tiny_checkpoint(ckpt, tmp_path, capsys):
    root = make_questions(tmp_path / "q", n=3)
    args = ["preference", "build", "--ckpt", str(ckpt[0]), "--questions", f"mcq:{root / 'mcq.jsonl'}",
            f"pope:{root / 'pope.jsonl'}", "--long-answers", str(root / "long.jsonl"), "--samples", "3",
            "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "pairs" in capsys.readouterr().out
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    rows = read_pairs(tmp_path / "a" / "pairs.jsonl")
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())["vlmforge_preference_build"]
    c = m["counts"]
    assert c["questions"] == c["questions_asked"] == 6 and c["samples"] == 18 and c["long_answers"] == 3
    assert c["pairs"] == len(rows) == sum(c["pairs_by_recipe"].values()) and c["pairs_by_recipe"]["dropout_ntp"] == 3
    for r in rows:  # what `vlmforge preference index` reads: MMPR rows, images under meta.json's root
        assert isinstance(r["image"], str) and (root / r["image"]).is_file() and meta["root"] == str(root.resolve())
        assert r["question"].startswith("<image>\n") and r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"]
        assert r["recipe"] in ("correctness", "dropout_ntp") and ":" in r["source"]
    for r in rows:
        if r["recipe"] == "dropout_ntp":
            words = r["chosen"].split()
            assert r["rejected"].startswith(" ".join(words[: len(words) // 2]))
    # seeded: another folder gets the same pairs; the finished folder reruns without change
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "pairs.jsonl").read_bytes() == (tmp_path / "b" / "pairs.jsonl").read_bytes()
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert read_pairs(tmp_path / "a" / "pairs.jsonl") == rows
    # other settings in the same folder: refused
    assert main([*args[:-1], "--seed", "1", "--out", str(tmp_path / "a")]) == 2
    assert "different inputs/settings" in capsys.readouterr().err
    # `vlmforge preference index` takes every pair, through meta.json's root
    from vlmforge.data.preference import command as index_command

    if index_command.HELP == "(being written)":
        pytest.skip("vlmforge preference index is not written yet")
    assert main(["preference", "index", "--input", str(tmp_path / "a" / "meta.json"), "--out", str(tmp_path / "idx"),
                 "--tokenizer", str(ckpt[0] / "tokenizer"), "--visual-tokens", "4"]) == 0
    index = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert index["counts"]["pairs"] == len(rows) and not index["dropped"]


def test_samples_depend_on_the_question_and_its_seed_only(ckpt):
    _, model, tok = ckpt
    sampler = ModelSampler(model, tok, temperature=1.0, top_p=0.9, max_new_tokens=6)
    red, blue = Image.new("RGB", (16, 16), (200, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 200))
    ask = SampleRequest([{"role": "user", "content": "<image>\nWhat colour is it?"}], [red], 4, seed=5)
    other = SampleRequest([{"role": "user", "content": "<image>\nIs there a star in the picture?"}], [blue], 3, seed=9)
    [first] = sampler.sample([ask])
    assert len({s.text for s in first}) > 1  # one question's rows are different draws
    # the same replies when asked alongside another question (longer prompt: left padding), in either place
    assert sampler.sample([other, ask])[1] == first and sampler.sample([ask, other])[0] == first
    # continuations: greedy, without the image, each row as it would be alone
    prompts = [[{"role": "user", "content": "Describe the image."}], [{"role": "user", "content": "What is there?"}]]
    both = sampler.continue_answers(prompts, ["A red circle", "The blue"], ["is on the left.", "square sits here."])
    alone = sampler.continue_answers(prompts[1:], ["The blue"], ["square sits here."])
    assert both[0].startswith("A red circle") and both[1] == alone[0]
