"""The kind registry is read from the modules in vlmforge/eval/kinds/, and the runner asks the kinds,
never their names: a kind that declares likelihood support is ranked by the likelihood protocol."""

from __future__ import annotations

import importlib
from pathlib import Path

from test_eval import FakeModel, make_world

import vlmforge.eval.kinds as kinds_package
from vlmforge.eval import evaluate
from vlmforge.eval.choices import lettered
from vlmforge.eval.items import common_item, require
from vlmforge.eval.kind import Kind
from vlmforge.eval.kinds import KINDS, get_kind


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
