"""Evaluation at scale: batches sorted by prompt length, split over torchrun ranks and merged in input
order (two gloo ranks give the one-rank predictions exactly), and answers that do not depend on the
batch a prompt lands in (greedy and sampled)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_model import tiny_model
from PIL import Image

from vlmforge.eval import evaluate
from vlmforge.eval.ranks import all_gather_json, length_sorted_batches, rank_batches
from vlmforge.eval.specs import TaskSpec
from vlmforge.eval.tasks import load_task

QUESTIONS = [
    "Colour?",
    "What colour is the picture?",
    "Look at the picture carefully and tell me which colour fills all of it?",
    "Which colour?",
    "Name the one colour you see in the image, please.",
    "Is it red, green or blue?",
    "What?",
]
COLORS = [(255, 0, 0), (0, 160, 0), (0, 0, 255)]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _world(root: Path) -> tuple[Path, Path]:
    """A VQA and an MCQ file whose questions differ in length (so sorting reorders them)."""
    (root / "images").mkdir(parents=True)
    vqa, mcq = [], []
    for i, q in enumerate(QUESTIONS):
        Image.new("RGB", (16, 16), COLORS[i % 3]).save(root / "images" / f"{i}.png")
        name = ["red", "green", "blue"][i % 3]
        vqa.append({"id": f"v{i}", "image": f"images/{i}.png", "question": q, "answers": [name] * 10})
        mcq.append({"id": f"m{i}", "image": f"images/{i}.png", "question": q, "answer": "ABC"[i % 3],
                    "options": {"A": "red", "B": "green", "C": "blue"}})
    for name, rows in (("vqa", vqa), ("mcq", mcq)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "vqa.jsonl", root / "mcq.jsonl"


def test_length_sorted_batches_cover_every_request_once_over_ranks():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = length_sorted_batches(lengths, 2)
    assert batches == [[1, 3], [5, 0], [4, 6], [2]]  # longest first, ties in input order
    shares = [rank_batches(batches, r, 3) for r in range(3)]
    assert shares == [[[1, 3], [2]], [[5, 0]], [[4, 6]]]
    assert sorted(i for share in shares for b in share for i in b) == list(range(7))
    assert all_gather_json({"3": [0.1, float("nan")]})[0]["3"][0] == 0.1  # one rank: a JSON round trip


def test_prompts_run_longest_first_and_rows_come_back_in_input_order(tmp_path):
    vqa, _ = _world(tmp_path)
    task = load_task(TaskSpec("vqa", "vqa", str(vqa)))
    seen: list[list[int]] = []

    def answer(prompts, images):  # the reply names the prompt's length, so rows can be checked
        lengths = [len(p[-1]["content"]) for p in prompts]
        seen.append(lengths)
        return [f"len {n}" for n in lengths]

    out = tmp_path / "out"
    evaluate(tasks=[task], generate_fn=answer, batch_size=3, progress=False, out_dir=out,
             prompt_length=lambda messages, n_images: len(messages[-1]["content"]))
    flat = [n for batch in seen for n in batch]
    assert flat == sorted(flat, reverse=True) and [len(b) for b in seen] == [3, 3, 1]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"v{i}" for i in range(len(QUESTIONS))]
    assert all(r["prediction"] == f"len {len(r['prompt'])}" for r in rows)


def test_answers_do_not_depend_on_the_batch(tiny_tokenizer_dir, tmp_path):
    """Greedy eval predictions at batch sizes 1 and 4, and sampled answers alone vs in a batch
    (each prompt samples from its own seeded generator)."""
    from vlmforge.model.decoding import generate
    from vlmforge.text.tokenization import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = tiny_model(tok, "model.projector.pool_size=2", spread=0.3)
    vqa, _ = _world(tmp_path)
    runs = []
    for bs in (1, 4):
        evaluate(model, tok, f"vqa:{vqa}", batch_size=bs, max_new_tokens=3, limit=5, out_dir=tmp_path / f"bs{bs}",
                 progress=False)
        runs.append((tmp_path / f"bs{bs}" / "predictions.jsonl").read_text())
    assert runs[0] == runs[1]
    prompts = [[{"role": "user", "content": f"<image>{q}"}] for q in QUESTIONS[:3]]
    images = [[Image.new("RGB", (16, 16), c)] for c in COLORS]
    kw = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.95, "return_ids": True}
    together = generate(model, tok, prompts, images, seed=[11, 12, 13], **kw)
    alone = [generate(model, tok, prompts[i : i + 1], images[i : i + 1], seed=[11 + i], **kw)[0] for i in range(3)]
    assert together == alone and len({tuple(t) for t in together}) > 1
    assert generate(model, tok, prompts[1:], images[1:], seed=12, **kw)[0] == together[1]  # an int seeds each alike


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_ranks_give_the_one_rank_results(tiny_tokenizer_dir, tmp_path):
    from vlmforge.cli import main
    from vlmforge.config import load_recipe
    from vlmforge.model.saving import save_vlm
    from vlmforge.text.tokenization import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    overrides = ["model.projector.pool_size=2"]
    ckpt = save_vlm(tiny_model(tok, *overrides, spread=0.3), tok, load_recipe(None, overrides), tmp_path / "ckpt")
    vqa, mcq = _world(tmp_path / "world")
    args = ["eval", "--ckpt", str(ckpt), "--tasks", f"vqa:{vqa},mcq:{mcq}", "--mc-protocol", "generate,likelihood",
            "--batch-size", "2", "--max-new-tokens", "2", "--limit", "5", "--device", "cpu"]
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "vlmforge", *args,
                            "--out", str(tmp_path / "two")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # the one-rank reference, meanwhile
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    one_rows = (tmp_path / "one" / "predictions.jsonl").read_text()
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == one_rows
    assert len(one_rows.splitlines()) == 3 * 5  # vqa, mcq by letter, mcq by likelihood
    one, two_res = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["tasks"] == two_res["tasks"]
    assert (one["settings"]["world_size"], two_res["settings"]["world_size"]) == (1, 2)
