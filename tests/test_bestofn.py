"""Best-of-N evaluation: selection rules and BoN-k curves on hand-worked candidates, the runner with fake
policies and a fake critic (what every rule selects, the output schema), and with a tiny model (candidate 0
is the greedy reply; samples are reproducible and independent of the batch; the real critic module; two
gloo ranks give the one-rank outputs; --best-of-n 1 changes nothing)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_model import tiny_model
from PIL import Image
from test_eval import NAMES, FakeModel, _color_of, _write_jsonl, make_world

from vlmforge.eval import evaluate
from vlmforge.eval.bestofn import (
    BestOfN,
    Candidate,
    Chosen,
    bon_ks,
    candidate_seed,
    check_settings,
    choose,
    critic_scorer,
    curves,
    majority_index,
    oracle_index,
    scored_candidates,
    select_index,
)
from vlmforge.eval.items import EvalItem, TaskError
from vlmforge.eval.kinds import get_kind
from vlmforge.eval.runner import summary_table

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _cands(extracted, prm=None, orm=None):
    return [Candidate(text=str(e), extracted=e, score=0.0,
                      prm=None if prm is None else prm[i], orm=None if orm is None else orm[i])
            for i, e in enumerate(extracted)]


# ------------------------------------------------------------------------------ selection rules


def test_selection_rules_and_their_ties():
    # majority: A twice beats B once; a tie goes to the answer seen first; unreadable answers do not vote
    assert majority_index(_cands([None, "B", "A", "A"])) == 2
    assert majority_index(_cands([None, "B", "A", "A", "B"])) == 1
    assert majority_index(_cands([None, None])) == 0
    assert majority_index(_cands(["The red.", "blue", "red"])) == 0  # answers compared after VQA normalisation
    assert majority_index(_cands(["B", "a", "A"])) == 1  # a bare letter is not an article
    assert majority_index(_cands([7.0, 3.0, 7.0, 3.0])) == 0
    # prm / orm: the highest score, the lower index on ties; first: greedy
    cands = _cands(["A", "B", "C", "D"], prm=[0.2, 0.9, 0.9, 0.1], orm=[0.5, 0.1, 0.7, 0.7])
    assert [select_index(cands, r) for r in ("prm", "orm", "first", "majority")] == [1, 2, 0, 0]
    assert oracle_index([Candidate("x", "x", s) for s in (0.0, 1.0, 0.3, 1.0)]) == 1
    with pytest.raises(ValueError, match="critic"):
        select_index(_cands(["A"]), "prm")
    chosen = choose(None, cands, "orm")
    assert isinstance(chosen, Chosen) and (chosen.selected, chosen.prediction) == (2, "C")


def test_prm_aggregates_and_orm_from_step_scores():
    kind = get_kind("mcq")
    item = EvalItem(id="q", question="?", images=[], answer="A", options={"A": "x", "B": "y"})
    scores = [[0.9, 0.9, 0.2], [0.5, 0.6]]  # mean .667 / .55, min .2 / .5, last .2 / .6, product .162 / .3
    picks = {rule: select_index(scored_candidates(kind, item, ["A", "B"], scores, rule), "prm")
             for rule in ("mean", "min", "last", "product")}
    assert picks == {"mean": 0, "min": 1, "last": 1, "product": 1}
    a, b = scored_candidates(kind, item, ["A", "B"], scores)
    assert (a.score, b.score, a.orm, b.orm) == (1.0, 0.0, 0.2, 0.6) and a.prm == pytest.approx(2.0 / 3.0)
    assert a.row() == {"text": "A", "extracted": "A", "score": 1.0, "step_scores": [0.9, 0.9, 0.2],
                       "prm": a.prm, "orm": 0.2}
    assert scored_candidates(kind, item, ["B"], None)[0].row() == {"text": "B", "extracted": "B", "score": 0.0,
                                                                   "prm": None, "orm": None}
    assert bon_ks(8) == [1, 2, 4, 8] and bon_ks(6) == [1, 2, 4, 6] and bon_ks(1) == [1]
    # a seed is a function of (sample seed, run seed, item, candidate) alone
    assert candidate_seed(0, 0, "q1", 1) == candidate_seed(0, 0, "q1", 1)
    assert len({candidate_seed(*k) for k in [(0, 0, "q1", 1), (1, 0, "q1", 1), (0, 1, "q1", 1), (0, 0, "q2", 1),
                                                (0, 0, "q1", 2)]}) == 5


def test_settings_that_cannot_run_are_refused():
    with pytest.raises(ValueError, match=r"--select prm needs a process reward model: give --critic"):
        check_settings(BestOfN(n=4, select="prm"), has_critic=False)
    with pytest.raises(ValueError, match="--select orm"):
        check_settings(BestOfN(n=1, select="orm"), has_critic=False)
    with pytest.raises(ValueError, match="--aggregate"):
        check_settings(BestOfN(n=4, aggregate="median"), has_critic=True)
    with pytest.raises(ValueError, match="--temperature"):
        check_settings(BestOfN(n=4, temperature=0.0), has_critic=False)
    check_settings(BestOfN(n=4), has_critic=False)  # majority without a critic
    assert BestOfN(n=4).rule(True) == "prm" and BestOfN(n=4).rule(False) == "majority"


# ------------------------------------------------------------------------------ curves


def _chosen(kind, items, texts, scores=None, rule="first"):
    return [choose(it, scored_candidates(kind, it, t, None if scores is None else scores[i]), rule)
            for i, (it, t) in enumerate(zip(items, texts))]


def test_curves_on_hand_worked_multiple_choice():
    kind = get_kind("mcq")
    items = [EvalItem(id=f"q{i}", question="?", images=[], answer="A", options=dict(zip("ABCD", "wxyz")))
             for i in range(3)]
    texts = [["B", "A", "A", "C"],  # greedy wrong; majority of 2: B (tie, first seen); of 4: A
             ["A", "B", "B", "B"],  # greedy right; majority of 2: A (tie); of 4: B
             ["", "", "A", "C"]]  # nothing readable in the first two: candidate 0; of 4: A (tie, first seen)
    scores = [[[0.2], [0.8], [0.9], [0.1]], [[0.5], [0.6], [0.1], [0.6]], [[0.3], [0.3], [0.2], [0.9]]]
    got = curves(kind, _chosen(kind, items, texts, scores), [1, 2, 4], ["first", "majority", "orm", "prm"])
    third = 1.0 / 3.0
    assert got == {
        "first": [third, third, third],
        "majority": [third, third, 2 * third],
        "orm": [third, third, third],  # q0 A (k 2, 4); q1 B (k 2, 4, the lower index of a tie); q2 C
        "prm": [third, third, third],
        "pass": [third, 2 * third, 1.0],
    }


def test_curves_use_the_kinds_own_metric_pope_f1_and_circular_accuracy():
    pope = get_kind("pope")
    gold = ["yes", "yes", "yes", "no"]
    items = [EvalItem(id=f"p{i}", question="?", images=[], answer=g) for i, g in enumerate(gold)]
    texts = [["Yes", "No"], ["No", "Yes"], ["No", "No"], ["Yes", "No"]]
    got = curves(pope, _chosen(pope, items, texts), [1, 2], ["first", "majority"])
    # greedy: yes no no yes -> tp 1, fp 1, fn 2: P 1/2, R 1/3, F1 0.4 (accuracy would be 0.25);
    # oracle of 2: yes yes no no -> tp 2, fn 1: F1 0.8 (accuracy 0.75); majority ties go to the greedy answer
    assert got["first"] == pytest.approx([0.4, 0.4]) and got["majority"] == pytest.approx([0.4, 0.4])
    assert got["pass"] == pytest.approx([0.4, 0.8])

    mmb = get_kind("mmbench")
    opts = {"A": "x", "B": "y"}
    items = [EvalItem(id=f"{g}r{r}", question="?", images=[], answer="AB"[r], options=opts, group=g,
                      meta={"rotation": r}) for g in ("g1", "g2") for r in (0, 1)]
    texts = [["A", "B"], ["A", "B"], ["A", "A"], ["B", "B"]]  # g1: one rotation right per candidate; g2 right
    got = curves(mmb, _chosen(mmb, items, texts), [1, 2], ["first"])
    assert got == {"first": [0.5, 0.5], "pass": [0.5, 1.0]}  # circular accuracy (plain accuracy: 0.75)


# ------------------------------------------------------------------------------ the runner, fake policies


def _math_world(root: Path) -> Path:
    """make_world plus eval/math.jsonl: "how many" asked of the colour images, the answer the colour's index."""
    world = make_world(root, n=8)
    rows = [{"id": f"h{i}", "image": f"images/{i:03d}.png", "question": "How many?", "answer": str(i % 4),
             "answer_type": "integer"} for i in range(8)]
    _write_jsonl(world / "eval" / "math.jsonl", rows)
    return world


def _wrong(reply: str) -> str:
    return {"Yes": "No.", "No, it is not.": "Yes"}.get(reply, "B" if reply == "A" else "A" if len(reply) == 1 else reply)


class Policy:
    """Greedy: right on even-numbered colours; sampled: right when the seed is even. Math replies are two steps."""

    def __init__(self):
        self.oracle = FakeModel()
        self.sample_calls = []

    def _reply(self, messages, images, right: bool) -> str:
        if "How many?" in messages[-1]["content"]:
            n = NAMES.index(_color_of(images[-1]))
            return f"I look at the picture.\n\nThe answer is {n if right else n + 1}."
        reply = self.oracle([messages], [images])[0]
        return reply if right else _wrong(reply)

    def greedy(self, prompts, images):
        return [self._reply(m, ims, NAMES.index(_color_of(ims[-1])) % 2 == 0) for m, ims in zip(prompts, images)]

    def sample(self, prompts, images, seeds):
        self.sample_calls.append(list(seeds))
        return [self._reply(m, ims, s % 2 == 0) for m, ims, s in zip(prompts, images, seeds)]


def oracle_critic(requests):
    """Scores a math step "The answer is N" 0.9 when N is the image's colour index, else 0.1; others 0.5."""
    out = []
    for r in requests:
        assert "<image>" not in r.question and len(r.images) == 1  # the query's own image only
        n = NAMES.index(_color_of(r.images[0])) if "How many?" in r.question else None
        out.append([0.5 if "answer is" not in s else 0.9 if f"answer is {n}." in s else 0.1 for s in r.steps])
    return out


def test_best_of_n_with_fake_policy_and_critic(tmp_path):
    world = _math_world(tmp_path / "world")
    policy = Policy()
    plain = evaluate(tasks="synth-math,synth-pope,synth-mcq", synth_dir=world, generate_fn=policy.greedy,
                     batch_size=3, progress=False, out_dir=tmp_path / "plain")
    bon = BestOfN(n=4)
    out = tmp_path / "bon"
    res = evaluate(tasks="synth-math,synth-pope,synth-mcq", synth_dir=world, generate_fn=policy.greedy,
                   sample_fn=policy.sample, step_scorer=oracle_critic, best_of_n=bon, batch_size=3,
                   progress=False, out_dir=out)
    plain_rows = [json.loads(x) for x in (tmp_path / "plain" / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in plain_rows]
    for r, p in zip(rows, plain_rows):
        assert r["candidates"][0]["text"] == p["prediction"]  # candidate 0 is the greedy reply
        assert len(r["candidates"]) == 4 and r["prediction"] == r["candidates"][r["selected"]]["text"]
        assert (r["score"], r["extracted"]) == (r["candidates"][r["selected"]]["score"],
                                                r["candidates"][r["selected"]]["extracted"])
    for name, r in res.items():
        b = r["best_of_n"]
        assert set(b) >= {"n", "ks", "select", "aggregate", "temperature", "top_p", "curves"}
        assert (b["n"], b["ks"], b["select"], b["aggregate"], b["temperature"], b["top_p"]) == (
            4, [1, 2, 4], "prm", "mean", 0.7, 0.95)
        assert list(b["curves"]) == ["first", "majority", "orm", "prm", "pass"]
        primary = plain[name]["metrics"][plain[name]["primary"]]
        assert all(c[0] == primary for c in b["curves"].values())  # BoN-1 is greedy, for every rule
        assert b["curves"]["prm"][-1] == r["metrics"][r["primary"]]  # the metrics are the selected candidates'
        assert b["curves"]["first"] == [primary] * 3
        assert b["curves"]["pass"] == sorted(b["curves"]["pass"])  # pass@k cannot fall
        assert all(p >= v for c in b["curves"].values() for p, v in zip(b["curves"]["pass"], c))
    # the oracle critic finds a right solution whenever one of the candidates is right
    math_bon = res["synth-math"]["best_of_n"]["curves"]
    assert math_bon["prm"] == math_bon["pass"] == math_bon["orm"] and math_bon["pass"][-1] > math_bon["first"][-1]
    math_rows = [r for r in rows if r["task"] == "synth-math"]
    for r in math_rows:
        for c in r["candidates"]:
            assert len(c["step_scores"]) == 2 and c["orm"] == c["step_scores"][-1]
            assert c["prm"] == pytest.approx(sum(c["step_scores"]) / 2)
    # replies without a readable step ("Yes") still get one step; every candidate has the keys
    assert all(set(c) == {"text", "extracted", "score", "step_scores", "prm", "orm"}
               for r in rows for c in r["candidates"])
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["best_of_n"]["n"] == 4 and results["tasks"]["synth-pope"]["primary"] == "f1"
    table = summary_table(res)
    assert "best-of-4 (mean)" in table and re.search(r"\n  prm \*\s+[\d. ]+\n  pass", table)
    # candidate seeds are per item and candidate, so the sampler's seeds do not depend on the batch size
    again = Policy()
    evaluate(tasks="synth-math", synth_dir=world, generate_fn=again.greedy, sample_fn=again.sample,
             step_scorer=oracle_critic, best_of_n=bon, batch_size=8, progress=False, out_dir=tmp_path / "bs8")
    lines = (out / "predictions.jsonl").read_text().splitlines(True)
    assert (tmp_path / "bs8" / "predictions.jsonl").read_text() == "".join(lines[: len(math_rows)])


def test_majority_without_critic_and_k_shot_and_likelihood_rows(tmp_path):
    world = _math_world(tmp_path / "world")
    policy = Policy()
    out = tmp_path / "o"
    res = evaluate(tasks="synth-math,synth-mcq", synth_dir=world, generate_fn=policy.greedy, sample_fn=policy.sample,
                   rank_fn=lambda p, i, opts: [[0.0] * len(o) for o in opts], mc_protocols=["generate", "likelihood"],
                   best_of_n=BestOfN(n=3), shots=[0, 1], seeds=[0, 1], batch_size=4, progress=False, out_dir=out)
    assert res["synth-math"]["best_of_n"]["select"] == "majority"
    assert list(res["synth-math"]["best_of_n"]["curves"]) == ["first", "majority", "pass"]
    assert "best_of_n" in res["synth-math@1shot"] and "best_of_n" not in res["synth-mcq@likelihood"]
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all("candidates" not in r for r in rows if r.get("protocol") == "likelihood")
    assert all(set(r["candidates"][0]) == {"text", "extracted", "score", "prm", "orm"}
               for r in rows if r.get("protocol") != "likelihood")
    with pytest.raises(TaskError, match="--critic"):
        evaluate(tasks="synth-math", synth_dir=world, generate_fn=policy.greedy, sample_fn=policy.sample,
                 best_of_n=BestOfN(n=3, select="prm"), progress=False)


# ------------------------------------------------------------------------------ a tiny model


def _vqa(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (q, c) in enumerate([("Colour?", (255, 0, 0)), ("What colour is the picture?", (0, 160, 0)),
                                ("Which colour fills all of it?", (0, 0, 255)), ("Name the colour.", (9, 9, 9)),
                                ("What?", (200, 100, 0))]):
        Image.new("RGB", (16, 16), c).save(root / "images" / f"{i}.png")
        rows.append({"id": f"v{i}", "image": f"images/{i}.png", "question": q, "answers": ["red"] * 10})
    _write_jsonl(root / "vqa.jsonl", rows)
    return root / "vqa.jsonl"


def test_tiny_model_candidates_greedy_first_samples_reproducible_and_batch_free(tiny_tokenizer_dir, tmp_path):
    from vlmforge.text.tokenization import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = tiny_model(tok, "model.projector.pool_size=2", spread=0.3)
    vqa = _vqa(tmp_path / "w")
    kw = {"max_new_tokens": 4, "progress": False}
    evaluate(model, tok, f"vqa:{vqa}", batch_size=2, out_dir=tmp_path / "plain", **kw)
    runs = {}
    for name, bs, seed in (("a", 1, 0), ("b", 4, 0), ("c", 2, 1)):
        evaluate(model, tok, f"vqa:{vqa}", batch_size=bs, out_dir=tmp_path / name,
                 best_of_n=BestOfN(n=3, temperature=1.0, seed=seed), **kw)
        runs[name] = [json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
    plain = [json.loads(x)["prediction"] for x in (tmp_path / "plain" / "predictions.jsonl").read_text().splitlines()]
    assert [r["candidates"][0]["text"] for r in runs["a"]] == plain
    assert runs["a"] == runs["b"]  # batch size 1 and 4: the same samples
    sampled = [c["text"] for r in runs["a"] for c in r["candidates"][1:]]
    assert sampled != [c["text"] for r in runs["c"] for c in r["candidates"][1:]]  # another sample seed
    assert len(set(sampled)) > 1

    # the real critic module, with the tiny model as critic: one score in (0, 1) per step
    from vlmforge.critic.steps import split_steps

    evaluate(model, tok, f"vqa:{vqa}", batch_size=2, out_dir=tmp_path / "critic",
             best_of_n=BestOfN(n=2, temperature=1.0), step_scorer=critic_scorer(model, tok, batch_size=3), **kw)
    rows = [json.loads(x) for x in (tmp_path / "critic" / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["candidates"][0]["text"] == plain[int(r["id"][1:])]
        for c in r["candidates"]:
            assert len(c["step_scores"]) == len(split_steps(c["text"]))
            assert all(0.0 < s < 1.0 for s in c["step_scores"])


# ------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer_dir):
    from vlmforge.config import load_recipe
    from vlmforge.model.saving import save_vlm
    from vlmforge.text.tokenization import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    overrides = ["model.projector.pool_size=2"]
    return save_vlm(tiny_model(tok, *overrides, spread=0.3), tok, load_recipe(None, overrides),
                    tmp_path_factory.mktemp("bon") / "ckpt")


def _strip_seconds(path: Path) -> str:
    return "".join(line for line in path.read_text().splitlines(True) if '"seconds"' not in line)


def test_command_best_of_n_one_is_the_plain_run_and_prm_needs_a_critic(ckpt, tmp_path, capsys):
    from vlmforge.cli import main

    world = make_world(tmp_path / "world", n=3)
    args = ["eval", "--ckpt", str(ckpt), "--tasks", "synth-vqa,synth-pope", "--synth-dir", str(world),
            "--max-new-tokens", "3", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "one"), "--best-of-n", "1"]) == 0
    for name in ("predictions.jsonl", "results.json"):
        assert _strip_seconds(tmp_path / "one" / name) == _strip_seconds(tmp_path / "plain" / name)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "x"), "--best-of-n", "4", "--select", "prm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--select prm needs a process reward model: give --critic" in err
    assert main([*args, "--out", str(tmp_path / "x"), "--best-of-n", "4", "--select", "best"]) == 2
    assert "--select" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "x"), "--best-of-n", "2", "--critic", str(tmp_path / "nope")]) == 2
    assert "--critic" in capsys.readouterr().err

    assert main([*args, "--out", str(tmp_path / "bon"), "--best-of-n", "3", "--critic", str(ckpt),
                 "--aggregate", "min", "--temperature", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "best-of-3 (min)" in printed and "  pass" in printed and "  prm *" in printed
    results = json.loads((tmp_path / "bon" / "results.json").read_text())
    assert results["critic"] == str(ckpt)
    b = results["tasks"]["synth-pope"]["best_of_n"]
    assert (b["n"], b["ks"], b["select"], b["aggregate"], b["temperature"]) == (3, [1, 2, 3], "prm", "min", 1.0)
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())["tasks"]
    assert b["curves"]["first"][0] == plain["synth-pope"]["metrics"]["f1"]


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_ranks_give_the_one_rank_best_of_n(ckpt, tmp_path):
    from test_eval_dist import _world

    from vlmforge.cli import main

    vqa, mcq = _world(tmp_path / "world")
    args = ["eval", "--ckpt", str(ckpt), "--tasks", f"vqa:{vqa},mcq:{mcq}", "--mc-protocol", "generate,likelihood",
            "--batch-size", "2", "--max-new-tokens", "3", "--limit", "5", "--device", "cpu",
            "--best-of-n", "3", "--critic", str(ckpt), "--temperature", "1.0"]
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "vlmforge", *args,
                            "--out", str(tmp_path / "two")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    one_rows = (tmp_path / "one" / "predictions.jsonl").read_text()
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == one_rows
    assert sum("candidates" in json.loads(r) for r in one_rows.splitlines()) == 10  # vqa and mcq by letter
    one, two_res = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["tasks"] == two_res["tasks"] and "best_of_n" in one["tasks"]["vqa:vqa"]

