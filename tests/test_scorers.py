"""Scorers against hand-worked cases (no model)."""

from __future__ import annotations

import pytest

from vlmforge.eval.answers import normalize_answer
from vlmforge.eval.choices import extract_option
from vlmforge.eval.items import EvalItem
from vlmforge.eval.kind import Scored
from vlmforge.eval.kinds import get_kind as make_scorer
from vlmforge.eval.kinds.math import MathKind as MathScorer
from vlmforge.eval.kinds.math import extract_number
from vlmforge.eval.kinds.mmbench import expand_circular, rotate_options
from vlmforge.eval.kinds.pope import extract_yes_no, pope_metrics
from vlmforge.eval.kinds.vqa import most_common_answer, vqa_accuracy

# ------------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    "matches, expected",
    # m of 10 humans match. Leaving out a matching answer leaves m-1 matches, another one m:
    # acc = (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_leave_one_out(matches, expected):
    answers = ["cat"] * matches + ["dog", "cow", "pig", "hen", "owl", "bee", "ant", "elk", "yak", "emu"][: 10 - matches]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_normalisation_numbers_punctuation_articles_contractions():
    assert normalize_answer("Two dogs.") == normalize_answer("2 dogs") == "2 dogs"
    assert normalize_answer("The cat") == "cat"
    assert normalize_answer("an apple") == "apple"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("Yes!") == "yes"
    assert normalize_answer("2.5") == "2.5"  # a period before a digit is kept
    assert normalize_answer("1,000") == "1000"  # digit,digit comma: punctuation deleted, not spaced
    assert normalize_answer("black/white") == "black white"  # mark not touching a space -> space
    assert normalize_answer("none") == "0"
    # "Two dogs." scores as "2 dogs" against ten humans of whom 3 said "2 dogs"
    answers = ["2 dogs"] * 3 + ["dogs"] * 7
    assert vqa_accuracy("Two dogs.", answers) == pytest.approx(0.9)


def test_vqa_official_unanimous_quirk_is_optional():
    answers = ["2 dogs"] * 10
    assert vqa_accuracy("Two dogs.", answers) == 1.0
    # The official script skips normalisation when all humans agree (annotations are pre-normalised).
    assert vqa_accuracy("Two dogs.", answers, official_skip_unanimous=True) == 0.0
    assert vqa_accuracy("2 Dogs", answers, official_skip_unanimous=True) == 1.0  # still case-insensitive


def test_vqa_single_reference_is_exact_match():
    assert vqa_accuracy("The Table.", ["table"]) == 1.0
    assert vqa_accuracy("chair", ["table"]) == 0.0


def test_most_common_answer_for_demonstrations():
    assert most_common_answer(["two", "2", "3", "three ", "2"]) == "two"


# ------------------------------------------------------------------------------------ MCQ

OPTS = {"A": "cat", "B": "dog", "C": "red", "D": "dark red"}


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("B", "B"), ("(C)", "C"), ("D.", "D"), ("b", "B"), ("[A]", "A"),
        ("The answer is A.", "A"), ("Answer: (B)", "B"), ("answer is C, red", "C"),
        ("A. cat", "A"), ("(B) dog", "B"), ("C: red", "C"),
        ("I see (D) here", "D"),
        ("It is a dog", "B"),  # unique option text
        ("dark red", "D"),  # "red" is inside the longer matched "dark red"
        ("red", "C"),
        ("A cat", "A"),  # "A" followed by its own option text
        ("A dog", "B"),  # "A" here is an article: the option text "dog" decides
        ("B\nbecause it barks", "B"), ("B dog", "B"),
        ("cat or dog", None), ("", None), ("E", None), ("The answer is E", None), ("nothing", None),
    ],
)
def test_extract_option(reply, letter):
    assert extract_option(reply, OPTS) == letter


def test_rotate_options():
    opts = {"A": "cat", "B": "dog", "C": "cow", "D": "pig"}
    rotated, ans = rotate_options(opts, "B", 1)
    assert rotated == {"A": "dog", "B": "cow", "C": "pig", "D": "cat"} and ans == "A"
    rotated, ans = rotate_options(opts, "B", 3)
    assert rotated == {"A": "pig", "B": "cat", "C": "dog", "D": "cow"} and ans == "C"
    assert rotate_options(opts, "D", 0) == (opts, "D")


def _mcq(qid, answer="B", category="cat1"):
    return EvalItem(id=qid, question="q?", images=[], options=dict(OPTS), answer=answer, meta={"category": category})


def test_circular_eval_counts_a_question_only_if_all_rotations_right():
    items = expand_circular([_mcq("q1"), _mcq("q2")])
    assert len(items) == 8 and {it.group for it in items} == {"q1", "q2"}
    # Each rotation's answer letter points at the same text ("dog").
    assert all(it.options[it.answer] == "dog" for it in items)
    scorer = make_scorer("mmbench")
    replies = {}
    for it in items:
        replies[it.id] = it.answer  # right
    replies["q2#r2"] = "A" if items[6].answer != "A" else "B"  # one wrong rotation of q2
    records = [scorer.score_prediction(replies[it.id], it) for it in items]
    m = scorer.aggregate(records)
    assert m["circular_accuracy"] == 0.5  # q1 all right, q2 one rotation wrong
    assert m["accuracy"] == 1.0  # both original orders right
    assert m["accuracy_all_rotations"] == pytest.approx(7 / 8)
    assert m["n_questions"] == 2
    assert scorer.chance(items)["circular_accuracy"] == pytest.approx(0.25**4)


def test_mcq_always_a_is_wrong_under_circular_eval():
    items = expand_circular([_mcq("q1", answer="A")])
    scorer = make_scorer("mmbench")
    m = scorer.aggregate([scorer.score_prediction("A", it) for it in items])
    assert m["accuracy"] == 1.0 and m["circular_accuracy"] == 0.0


def test_mcq_unresolved_counts_as_wrong_and_per_category():
    scorer = make_scorer("mcq")
    items = [_mcq("1", "A", "x"), _mcq("2", "B", "x"), _mcq("3", "C", "y")]
    records = [scorer.score_prediction(p, it) for p, it in zip(["A", "no idea", "C"], items)]
    assert [r.extracted for r in records] == ["A", None, "C"]
    m = scorer.aggregate(records)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["accuracy/x"] == 0.5 and m["accuracy/y"] == 1.0
    assert scorer.chance(items)["accuracy"] == 0.25


# ----------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    "reply, label",
    [("Yes", "yes"), ("yes, there is a cat.", "yes"), ("No.", "no"), ("There is not a dog. Yes.", "no"),
     ("No, there isn't", "no"), ("maybe", None), ("", None)],
)
def test_extract_yes_no(reply, label):
    assert extract_yes_no(reply) == label


def test_pope_metrics_small_confusion_matrix():
    gold = ["yes"] * 4 + ["no"] * 6
    pred = ["yes", "yes", "yes", "no"] + ["yes", "yes", "no", "no", "no", "no"]  # TP 3, FN 1, FP 2, TN 4
    m = pope_metrics(pred, gold)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 4)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.6)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m["yes_ratio"] == pytest.approx(0.5)


def test_pope_unresolved_is_wrong_but_not_a_yes():
    gold = ["yes", "yes", "no", "no"]
    m = pope_metrics(["yes", None, None, "no"], gold)
    assert m["accuracy"] == 0.5 and m["precision"] == 1.0 and m["recall"] == 0.5 and m["yes_ratio"] == 0.25


def test_pope_chance():
    items = [EvalItem(id=str(i), question="", images=[], answer=a) for i, a in enumerate(["yes", "no", "yes", "no"])]
    assert make_scorer("pope").chance(items) == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}


# ----------------------------------------------------------------------------------- math


def _math(answer, qtype="free_form", atype="integer", precision=None, choices=None):
    meta = {"question_type": qtype, "answer_type": atype}
    if precision is not None:
        meta["precision"] = precision
    options = {chr(65 + i): c for i, c in enumerate(choices)} if choices else None
    return EvalItem(id="m", question="", images=[], answer=answer, options=options, meta=meta)


@pytest.mark.parametrize(
    "reply, value",
    [("The answer is 3.5", 3.5), ("12, 13 and 1,234", 1234.0), ("answer: -2", -2.0), ("none", None),
     ("x = 4 so the answer is 7.", 7.0), ("3.", 3.0)],
)
def test_extract_number(reply, value):
    assert extract_number(reply) == value


def test_math_numbers_at_precision_and_choices():
    s = MathScorer()
    score = lambda reply, item: s.score_prediction(reply, item).score  # noqa: E731
    assert score("7", _math("7")) == 1.0
    assert score("7.0", _math("7")) == 1.0
    assert score("7.4", _math("7")) == 0.0
    assert score("1.234", _math("1.23", atype="float", precision=2)) == 1.0
    assert score("1.24", _math("1.23", atype="float", precision=2)) == 0.0
    assert score("1.2", _math("1.23", atype="float", precision=1)) == 1.0
    assert score("3.14159", _math("3.14", atype="float")) == 1.0  # precision from the reference's decimals
    item = _math("dog", qtype="multi_choice", atype="text", choices=["cat", "dog"])
    assert score("B", item) == 1.0 and score("dog", item) == 1.0 and score("A", item) == 0.0
    assert s.demo_answer(item) == "B"
    assert s.score_prediction("no number", _math("7")).extracted is None
    assert s.chance([item, _math("7")])["accuracy"] == 0.25


def test_scored_record_shape():
    rec = make_scorer("vqa").score_prediction("  Two dogs.\nextra", EvalItem(id="1", question="", images=[], answers=["2 dogs"] * 10))
    assert isinstance(rec, Scored) and rec.extracted == "Two dogs." and rec.score == 1.0
