"""Process reward scoring (vlmforge.critic.score, `vlmforge prm-score`): P('+') against P('-') at each
step's verdict turn from one forward pass, checked against the logits by hand and against scoring
every prefix of the conversation on its own; aggregation rules; the command's rows, labels metrics
and bad rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fixtures_model import tiny_model
from fixtures_train import COLOURS, one_torch_thread, square_png
from PIL import Image

from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.critic.command import AGGREGATE_CHOICES, label_metrics
from vlmforge.critic.score import AGGREGATES, StepRequest, aggregate, step_scores, verdict_ids
from vlmforge.critic.steps import critic_messages
from vlmforge.errors import UserError
from vlmforge.images import preprocess_batch
from vlmforge.model.saving import save_vlm
from vlmforge.text.chat import encode_conversation
from vlmforge.text.tokenization import load_tokenizer

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)
OVERRIDES = ("model.projector.pool_size=2",)  # 4 visual tokens per image


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, *OVERRIDES, spread=0.3)  # spread: scores far from one value


def square(colour: str) -> Image.Image:
    return Image.new("RGB", (64, 64), COLOURS[colour])


def test_a_step_score_is_p_plus_against_p_minus_from_the_logits(model, tok):
    question, steps = "How many shapes are there?", ["There is a red square.", "There are 1 shapes."]
    image = square("red")
    ids, _ = encode_conversation(tok, critic_messages(question, steps))
    expanded = []
    for i in ids:
        expanded += [i] * model.tokens_per_image if i == model.image_token_id else [i]
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    at = [p for p, i in enumerate(expanded) if i == plus]
    assert len(at) == 3  # the system prompt names '+' once, then the two placeholder replies
    at = at[1:]
    pv = preprocess_batch([image], model.preprocess_spec())
    with torch.no_grad():
        logits = model(torch.tensor([expanded]), pv, output="logits")[0].double()
    by_hand = []
    for p in at:
        prob = torch.softmax(logits[p - 1], -1)  # the token before '+' predicts it
        by_hand.append(float(prob[plus] / (prob[plus] + prob[minus])))
    got = step_scores(model, tok, [StepRequest(question, [image], steps)])
    assert got[0] == pytest.approx(by_hand, abs=1e-6)
    assert len({round(x, 4) for x in by_hand}) == 2  # two different numbers: the positions matter


def _requests():
    qs = ["How many shapes are there?", "What colour is the square?", "Is there a blue star?", "Describe the image."]
    steps = [
        ["There is a red square.", "There is a blue star.", "There are 2 shapes."],
        ["The square is green."],
        ["There is a small star.", "The star is blue.", "Yes."],
        ["A big circle at the left.", "Next to a green square.", "A tiny star at the top.", "There are 3 shapes."],
        ["No."],
    ]
    images = [[square("red")], [square("green")], [], [square("blue"), square("red")], [square("blue")]]
    return [StepRequest(qs[i % len(qs)], images[i], steps[i]) for i in range(len(steps))]


def test_one_pass_equals_scoring_each_prefix_alone(model, tok):
    reqs = _requests()
    full = step_scores(model, tok, reqs, batch_size=3)  # rows of different lengths: padding
    assert [len(s) for s in full] == [len(r.steps) for r in reqs]
    prefixes = [StepRequest(r.question, r.images, r.steps[: k + 1]) for r in reqs for k in range(len(r.steps))]
    alone = [s[-1] for s in step_scores(model, tok, prefixes, batch_size=1)]
    assert [x for s in full for x in s] == pytest.approx(alone, abs=1e-5)
    assert step_scores(model, tok, reqs, batch_size=8) == [pytest.approx(s, abs=1e-5) for s in full]
    assert all(0.0 < x < 1.0 for s in full for x in s)


def test_a_request_without_steps_scores_nothing(model, tok):
    reqs = [StepRequest("Q", [], []), StepRequest("What colour is the square?", [square("red")], ["Red."])]
    got = step_scores(model, tok, reqs)
    assert got[0] == [] and len(got[1]) == 1
    assert got[1] == pytest.approx(step_scores(model, tok, reqs[1:])[0], abs=1e-6)
    assert model.training is False


def test_aggregation_rules_by_hand():
    scores = [0.5, 0.8, 0.2]
    assert aggregate(scores, "mean") == pytest.approx(0.5)
    assert aggregate(scores, "min") == pytest.approx(0.2)
    assert aggregate(scores, "last") == pytest.approx(0.2)
    assert aggregate(scores, "product") == pytest.approx(0.08)
    assert aggregate([0.9], "product") == pytest.approx(0.9)
    assert all(aggregate([], rule) == 0.0 for rule in AGGREGATES)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        aggregate(scores, "max")
    assert AGGREGATE_CHOICES == AGGREGATES  # the command's choices, written without importing torch


def test_verdict_ids(tok):
    assert verdict_ids(tok) == (tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-"))

    class TwoTokenPlus:
        name_or_path = "fake-tok"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7, 8] if text == "+" else [9]}

    with pytest.raises(UserError, match=r"tokenizer fake-tok encodes the verdict '\+' as 2 tokens \[7, 8\]"):
        verdict_ids(TwoTokenPlus())


def test_label_metrics_by_hand():
    scores = [[0.9, 0.4, 0.2], [0.7, 0.6], [0.3, 0.8, 0.1]]
    labels = [["+", "-", "-"], ["+", "+"], ["+", "+", "-"]]
    m = label_metrics(scores, labels)
    # judged '+' when >= 0.5: right are 0.9+, 0.4-, 0.2-, 0.7+, 0.6+, 0.8+, 0.1-; wrong: 0.3 (a '+')
    assert m["step_accuracy"] == pytest.approx(7 / 8)
    assert m["plus_accuracy"] == pytest.approx(4 / 5) and m["minus_accuracy"] == pytest.approx(3 / 3)
    # wrong solutions: the 1st (first '-' at 1, first low at 1: found) and the 3rd ('-' at 2, low at 0: not)
    assert m["wrong_solutions"] == 2 and m["first_error_found"] == pytest.approx(0.5)
    assert (m["steps"], m["plus_steps"], m["minus_steps"], m["solutions"]) == (8, 5, 3, 3)
    none = label_metrics([[0.9]], [["+"]])
    assert none["minus_accuracy"] is None and none["first_error_found"] is None


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def critic(tmp_path_factory, model, tok):
    root = tmp_path_factory.mktemp("prm_score")
    ckpt = save_vlm(model, tok, load_recipe(None, list(OVERRIDES)), root / "ckpt")
    images = root / "images"
    images.mkdir()
    for c in ("red", "blue"):
        (images / f"{c}.png").write_bytes(square_png(c))
    return root, ckpt


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROWS = [
    {"id": "a", "image": "red.png", "question": "How many shapes?",
     "prompt": "<image>\nHow many shapes? Think step by step.", "steps": ["There is a red square.", "So 1."],
     "labels": ["+", "-"]},
    {"id": "b", "images": ["blue.png"], "question": "What colour is the square?",
     "solution": "The square is blue.\n\nThe answer is blue.", "labels": ["+", "+"]},
    {"id": "c", "question": "Describe the image.", "solution": "One.\n\nTwo.\n\nThree.\n\nFour."},
]


def test_prm_score_writes_scores_and_label_metrics(critic, model, tok, tmp_path, capsys):
    root, ckpt = critic
    inp = _write(root / "images" / "sols.jsonl", ROWS)
    out = tmp_path / "scores.jsonl"
    assert main(["prm-score", "--critic", str(ckpt), "--input", str(inp), "--out", str(out), "--max-steps", "3",
                 "--aggregate", "min", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[2]["steps"] == ["One.\n\nTwo.", "Three.", "Four."]  # merged to --max-steps
    # the prompt (without its image marker) is what the critic is shown when a row has one
    expected = step_scores(model, tok, [
        StepRequest("How many shapes? Think step by step.", [square("red")], ROWS[0]["steps"]),
        StepRequest("What colour is the square?", [square("blue")], ["The square is blue.", "The answer is blue."]),
        StepRequest("Describe the image.", [], rows[2]["steps"])])
    for row, want in zip(rows, expected):
        assert row["step_scores"] == pytest.approx(want, abs=1e-5)
        assert row["score"] == pytest.approx(min(want), abs=1e-5)
    assert rows[0]["labels"] == ["+", "-"] and "labels" not in rows[2]
    manifest = json.loads((tmp_path / "scores.manifest.json").read_text())
    assert manifest["stage"] == "prm-score" and manifest["counts"]["scored"] == 3 and manifest["counts"]["steps"] == 7
    m = manifest["labels"]
    assert m == label_metrics([rows[0]["step_scores"], rows[1]["step_scores"]], [["+", "-"], ["+", "+"]])
    assert m["steps"] == 4 and m["wrong_solutions"] == 1
    assert "step accuracy" in printed and "first wrong step found" in printed
    # an existing output is refused without --overwrite
    assert main(["prm-score", "--critic", str(ckpt), "--input", str(inp), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["prm-score", "--critic", str(root), "--input", str(inp), "--out", str(out), "--overwrite"]) == 2
    assert "not a vlmforge checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("row, reason, message", [
    ({"id": "x", "image": "../outside.png", "question": "Q", "steps": ["a"]}, "path_outside_root", "outside the image root"),
    ({"id": "x", "image": "gone.png", "question": "Q", "steps": ["a"]}, "missing_image", "image file not found"),
    ({"id": "x", "question": "Q", "steps": ["a", "b"], "labels": ["+"]}, "bad_labels", "'labels' must be one"),
    ({"id": "x", "question": "Q", "steps": ["a"], "labels": ["ok"]}, "bad_labels", "'labels' must be one"),
    ({"id": "x", "steps": ["a"]}, "no_question", "no 'prompt' or 'question'"),
    ({"id": "x", "question": "Q"}, "no_steps", "no 'steps' list or 'solution'"),
    ({"id": "x", "question": "Q", "solution": "  \n\n "}, "no_steps", "has no steps"),
    ({"id": "x", "question": "Q", "steps": ["a", 3]}, "bad_steps", "'steps' must be a list of strings"),
    ({"id": "a", "question": "Q", "steps": ["a"]}, "duplicate_id", "duplicate id 'a'"),
    ("{not json", "json_error", "JSON does not parse"),
])
def test_bad_rows_stop_with_file_line_or_are_counted(critic, tmp_path, capsys, row, reason, message):
    root, ckpt = critic
    (tmp_path / "outside.png").write_bytes(square_png("red"))
    inp = _write(root / "images" / f"bad_{reason}.jsonl", [ROWS[0], row])
    out = tmp_path / "s.jsonl"
    assert main(["prm-score", "--critic", str(ckpt), "--input", str(inp), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{inp}:2: " in err and message in err
    assert not out.exists()
    assert main(["prm-score", "--critic", str(ckpt), "--input", str(inp), "--out", str(out), "--no-strict"]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a"]
    manifest = json.loads((tmp_path / "s.manifest.json").read_text())
    assert manifest["dropped"] == {reason: 1} and manifest["counts"]["rows"] == 2
    assert manifest["dropped_examples"][reason][0]["where"] == f"{inp}:2"


def test_a_bad_image_file_is_a_bad_row(critic, tmp_path, capsys):
    root, ckpt = critic
    (root / "images" / "broken.png").write_bytes(b"not a png")
    inp = _write(root / "images" / "broken.jsonl", [ROWS[0], {"id": "z", "image": "broken.png", "question": "Q",
                                                             "steps": ["a"]}])
    assert main(["prm-score", "--critic", str(ckpt), "--input", str(inp), "--out", str(tmp_path / "s.jsonl")]) == 2
    assert f"{inp}:2: image does not decode" in capsys.readouterr().err
    assert main(["prm-score", "--critic", str(ckpt), "--input", str(inp), "--out", str(tmp_path / "s.jsonl"),
                 "--no-strict", "--overwrite"]) == 0
    assert json.loads((tmp_path / "s.manifest.json").read_text())["dropped"] == {"bad_image": 1}
    assert not math.isnan(json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])["score"])
