"""The kind registry is read from the modules in vlmforge/eval/kinds/, and the runner asks the kinds,
never their names: a kind that declares likelihood support is ranked by the likelihood protocol."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from test_eval import FakeModel, make_world

import vlmforge.eval.kinds as kinds_package
from vlmforge.eval import evaluate
from vlmforge.eval.choices import lettered
from vlmforge.eval.items import RowError, common_item, require
from vlmforge.eval.kind import Kind
from vlmforge.eval.kinds import KINDS, get_kind
from vlmforge.eval.kinds.math import MathKind
from vlmforge.eval.prompt_parts import INTEGER_SUFFIX, REASONING_SUFFIX


def _kind_modules() -> list[str]:
    folder = Path(kinds_package.__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")


def test_every_module_in_the_kinds_folder_is_registered():
    modules = _kind_modules()
    assert {"mcq", "mmbench", "vqa", "pope", "math"} <= set(modules)
    declared = {}
    for name in modules:
        cls = importlib.import_module(f"vlmforge.eval.kinds.{name}").KIND
        assert issubclass(cls, Kind) and cls.name
        for kind_name in (cls.name, *cls.aliases):
            declared[kind_name] = cls
    assert KINDS == declared  # nothing registered from elsewhere, nothing in the folder left out
    assert KINDS["mcq-circular"] is KINDS["mmbench"]


def test_each_kind_reports_chance_for_its_headline_metric():
    for name in KINDS:
        kind = get_kind(name)
        assert kind.primary in kind.chance([]), name


class YesNoChoice(Kind):
    """POPE rows asked as a two-option multiple choice: a kind the runner has never heard of."""

    name = "yesno-choice"
    supports_likelihood = True

    def parse_row(self, row, image_root, where):
        item = common_item(row, image_root, where)
        item.options = lettered(["yes", "no"])
        item.answer = "A" if str(require(row, "answer")).lower() == "yes" else "B"
        return item

    def build_prompt(self, item):
        return f"{item.question}\nA. yes\nB. no"

    def extract(self, prediction, item):
        return prediction.strip()[:1] or None

    def score(self, extracted, item):
        return float(extracted == item.answer)

    def chance(self, items):
        return {"accuracy": 0.5}


def test_the_likelihood_protocol_takes_exactly_the_kinds_that_support_it(tmp_path, monkeypatch):
    monkeypatch.setitem(KINDS, YesNoChoice.name, YesNoChoice)
    world = make_world(tmp_path / "world")
    seen = []

    def rank(prompts, images, candidates):
        seen.extend(p[-1]["content"] for p in prompts)
        return [[0.0] * len(c) for c in candidates]

    tasks = f"synth-mcq,synth-vqa,synth-pope,yn=yesno-choice:{world / 'eval' / 'pope.jsonl'}"
    res = evaluate(tasks=tasks, synth_dir=world, generate_fn=FakeModel(), rank_fn=rank,
                   mc_protocols=["likelihood"], progress=False)
    kind_of = {"synth-mcq": "mmbench", "synth-vqa": "vqa", "synth-pope": "pope", "yn": "yesno-choice"}
    ranked = {name for name, kind in kind_of.items() if KINDS[kind].supports_likelihood}
    assert ranked == {"synth-mcq", "yn"}
    assert set(res) == {f"{n}@likelihood" for n in ranked} | {n for n in kind_of if n not in ranked}
    assert res["yn@likelihood"]["metrics"]["accuracy"] == 0.5  # ties go to A ("yes"): right on half
    assert len(seen) == 8 + 16 and not any("A. yes" in p for p in seen)  # open questions, no options


# --------------------------------------------------------------------------------- math, solved in steps

def _math_item(tmp_path, **row):
    (tmp_path / "i.png").write_bytes(b"")
    base = {"id": "m1", "image": "i.png", "question": "How many more circles than squares are there?", "answer": "1",
            "answer_type": "integer", "question_type": "free_form"}
    return MathKind(), MathKind().parse_row({**base, **row}, tmp_path, "math.jsonl:1")


def test_math_rows_solved_in_steps_are_asked_for_a_worked_solution(tmp_path):
    steps = ["There are 2 circles.", "There is 1 square.", "2 - 1 = 1.", "The answer is 1."]
    kind, item = _math_item(tmp_path, solve="steps", steps=steps)
    assert kind.build_prompt(item) == f"How many more circles than squares are there?\n{REASONING_SUFFIX}"
    assert kind.build_prompt(_math_item(tmp_path)[1]).endswith(f"\n{INTEGER_SUFFIX}")  # rows without solve: as before
    gold = "\n\n".join(steps)
    assert kind.demo_answer(item) == gold  # a k-shot demonstration shows the worked steps
    assert kind.score_prediction(gold, item).score == 1.0
    # the number after "answer is" counts, not the last number written
    wrong = "There are 3 circles.\n\nThere is 1 square.\n\n3 - 1 = 2.\n\nThe answer is 2."
    assert kind.score_prediction(wrong, item).score == 0.0
    assert kind.score_prediction("The answer is 1.\n\nThere are 2 circles.", item).score == 1.0
    r = kind.score_prediction("There are 2 circles.\n\nThere is 1 square.\n\n2 - 1 = 1.", item)  # cut short
    assert (r.extracted, r.score) == (1.0, 1.0)
    assert kind.score_prediction("There are no circles.", item).extracted is None
    assert kind.demo_answer(_math_item(tmp_path, solve="steps")[1]) == "The answer is 1."
    for bad, message in (({"solve": "think"}, "solve must be"), ({"solve": "steps", "steps": "a b"}, "list of strings"),
                         ({"solve": "steps", "answer_type": "text", "answer": "red"}, "integer or float")):
        with pytest.raises(RowError, match=message):
            _math_item(tmp_path, **bad)
