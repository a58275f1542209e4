"""`vlmforge preference build` on stub samplers with known answers: MMPR's pairing rules, dropout
next-token prediction, bad rows with file:line, resume after a kill, 2 ranks == 1 rank."""

from __future__ import annotations

import hashlib
import io
import json
import random

import pytest
from PIL import Image

from vlmforge.cli import main
from vlmforge.eval.items import EvalItem, TaskError
from vlmforge.eval.kinds import get_kind
from vlmforge.eval.specs import parse_task_specs
from vlmforge.preference.build import (
    BuildSettings,
    build_parts,
    build_preferences,
    load_plan,
    merge_parts,
    part_path,
    prepare_folder,
    question_seed,
    read_pairs,
)
from vlmforge.preference.pairs import Sample, correctness_pairs, first_half, without_image_markers

OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
REPLIES = ["A", "B", "C", "D", "The answer is B", "blue", "B.", "C, not B", "red, not blue", "", "Yes", "No", "no yes"]


def _png(rgb=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def make_questions(root, n: int = 6, bad: bool = False):
    """Question files (mcq, pope) and long answers over small images in ROOT/images."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "images" / f"{i}.png").write_bytes(_png((40 * i % 255, 30, 200)))
    mcq = [{"id": f"m{i}", "image": f"images/{i}.png", "question": "What colour is it?", "options": OPTIONS,
            "answer": "B"} for i in range(n)]
    pope = [{"id": f"p{i}", "image": f"images/{i}.png", "question": "Is there a circle?", "answer": "yes" if i % 2 else "no"}
            for i in range(n)]
    long = [{"id": f"l{i}", "image": f"images/{i}.png", "question": "Describe the image in detail.",
             "answer": f"The image shows {i + 2} shapes. A red circle is on the left and a blue square sits on the right."}
            for i in range(n)]
    if bad:
        (root / "images" / "broken.png").write_bytes(b"not an image")
        mcq += ["{not json", {"id": "nb", "image": "images/0.png", "question": "Q?", "options": OPTIONS},
                {"id": "ni", "image": "images/missing.png", "question": "Q?", "options": OPTIONS, "answer": "A"},
                {"id": "out", "image": "../outside.png", "question": "Q?", "options": OPTIONS, "answer": "A"},
                {"id": "m0", "image": "images/0.png", "question": "again", "options": OPTIONS, "answer": "A"},
                {"id": "dec", "image": "images/broken.png", "question": "Q?", "options": OPTIONS, "answer": "A"}]
        long += [{"id": "short", "image": "images/0.png", "question": "Describe.", "answer": "Circle."},
                 {"id": "noans", "image": "images/0.png", "question": "Describe."}]
    _write_jsonl(root / "mcq.jsonl", mcq)
    _write_jsonl(root / "pope.jsonl", pope)
    _write_jsonl(root / "long.jsonl", long)
    return root


class StubSampler:
    """Replies drawn from REPLIES by the question's seed; continuations made up from the prefix.
    ``kill_after``: raise on that many-th call, as a killed process would stop."""

    def __init__(self, kill_after: int | None = None, ending: str = " and nothing else is there."):
        self.kill_after, self.ending = kill_after, ending
        self.calls = 0
        self.seen: list[tuple[list, list, int]] = []

    def _tick(self):
        self.calls += 1
        if self.kill_after is not None and self.calls >= self.kill_after:
            raise KeyboardInterrupt("killed")

    def sample(self, requests):
        self._tick()
        out = []
        for r in requests:
            self.seen.append((r.messages, r.images, r.seed))
            rng = random.Random(r.seed)
            out.append([rng.choice(REPLIES) for _ in range(r.n)])
        return out

    def continue_answers(self, messages, prefixes, rests):
        self._tick()
        assert all("<image>" not in m[0]["content"] for m in messages)  # dropout: no image
        return [p + self.ending for p in prefixes]


def _plan(root, **kw):
    specs = parse_task_specs([f"mcq:{root / 'mcq.jsonl'}", f"pope:{root / 'pope.jsonl'}"])
    return load_plan(specs, root / "long.jsonl", **kw)


def _build(plan, out, settings, sampler, **kw):
    return build_preferences(plan, out, settings, lambda: sampler, identity={"test": 1}, progress=False, **kw)


# -- the pairing rules ----------------------------------------------------------------------------
def _mcq_item():
    return EvalItem(id="q", question="What colour?", images=[], options=dict(OPTIONS), answer="B")


def test_right_times_wrong_distinct_texts_and_negatives_stating_the_answer_skipped():
    samples = ["B", "The answer is B", "B", "A", "C", "A", "C, not B", "red, not blue", "", Sample("B.", finished=False)]
    pairs, stats = correctness_pairs(get_kind("mcq"), _mcq_item(), samples, 10, random.Random(0))
    assert pairs == [("B", "A"), ("B", "C"), ("The answer is B", "A"), ("The answer is B", "C")]
    assert stats.samples == 10 and stats.correct == 4 and stats.incorrect == 6  # "B." (cut off) is judged right
    assert stats.unfinished == 1 and stats.unusable == 1 and stats.duplicates == 2  # the 2nd "B" and the 2nd "A"
    # "C, not B" names the letter, "red, not blue" the option text of the right answer
    assert stats.negatives_with_answer == 2
    assert stats.pairs == 4 and stats.no_correct == 0 and stats.no_incorrect == 0
    assert stats.as_dict()["accuracy"] == pytest.approx(0.4)


def test_at_most_k_pairs_chosen_by_the_seed():
    samples = ["B", "The answer is B", "A", "C", "D"]
    every, _ = correctness_pairs(get_kind("mcq"), _mcq_item(), samples, 100, random.Random(0))
    assert len(every) == 6
    picks = {}
    for seed in range(8):
        pairs, stats = correctness_pairs(get_kind("mcq"), _mcq_item(), samples, 2, random.Random(seed))
        again, _ = correctness_pairs(get_kind("mcq"), _mcq_item(), samples, 2, random.Random(seed))
        assert pairs == again and len(pairs) == stats.pairs == 2 and len(set(pairs)) == 2
        assert [every.index(p) for p in pairs] == sorted(every.index(p) for p in pairs)  # subset, in order
        picks[seed] = tuple(pairs)
    assert len(set(picks.values())) > 1


def test_questions_without_a_right_or_a_wrong_sample_are_counted():
    _, none_right = correctness_pairs(get_kind("mcq"), _mcq_item(), ["A", "C"], 2, random.Random(0))
    assert none_right.no_correct == 1 and none_right.no_incorrect == 0 and none_right.pairs == 0
    _, none_wrong = correctness_pairs(get_kind("mcq"), _mcq_item(), ["B", "B."], 2, random.Random(0))
    assert none_wrong.no_correct == 0 and none_wrong.no_incorrect == 1 and none_wrong.pairs == 0
    # every wrong reply states the answer: no usable negative either
    _, stated = correctness_pairs(get_kind("mcq"), _mcq_item(), ["B", "C, not B"], 2, random.Random(0))
    assert stated.no_incorrect == 1 and stated.negatives_with_answer == 1


def test_vqa_partial_credit_is_neither_side_and_pope_yes_no():
    vqa = EvalItem(id="v", question="Colour?", images=[], answers=["red"] * 8 + ["dark red"] * 2)
    pairs, stats = correctness_pairs(get_kind("vqa"), vqa, ["red", "dark red", "blue", "a dark red one"], 5, random.Random(0))
    assert stats.partial == 1  # "dark red": 2 of 10 humans
    assert pairs == [("red", "blue")] and stats.negatives_with_answer == 1  # "a dark red one" says red
    pope = EvalItem(id="p", question="Is there a cat?", images=[], answer="yes")
    pairs, stats = correctness_pairs(get_kind("pope"), pope, ["Yes", "No", "no yes", "Maybe"], 5, random.Random(0))
    assert pairs == [("Yes", "No"), ("Yes", "Maybe")] and stats.negatives_with_answer == 1


def test_dropout_keeps_the_first_half_of_the_words():
    assert first_half("one two three four five") == "one two"
    assert first_half("  one   two  three four ") == "one two"
    assert first_half("a b") == "a" and first_half("single") is None and first_half("") is None
    assert without_image_markers("<image>\n<image>\nDescribe it.") == "Describe it."


# -- the build -----------------------------------------------------------------------------------
def test_build_writes_mmpr_rows_and_manifest(tmp_path):
    root = make_questions(tmp_path / "q")
    sampler = StubSampler()
    settings = BuildSettings(samples=6, pairs_per_question=3, questions_per_part=4, batch_size=4)
    m = _build(_plan(root), tmp_path / "out", settings, sampler)
    rows = read_pairs(tmp_path / "out" / "pairs.jsonl")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())["vlmforge_preference_build"]
    assert meta["root"] == m["image_root"] == str(root.resolve())
    assert meta["annotation"] == str((tmp_path / "out" / "pairs.jsonl").resolve())
    assert meta["length"] == len(rows) == m["counts"]["pairs"]
    by = m["counts"]["pairs_by_recipe"]
    assert by["correctness"] > 0 and by["dropout_ntp"] == 6 and by["correctness"] + by["dropout_ntp"] == len(rows)
    for r in rows:
        assert {"image", "question", "chosen", "rejected", "answer_gt", "recipe", "source", "kind"} <= set(r)
        assert (root / r["image"]).is_file() and r["question"].startswith("<image>\n")
        assert r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]
        assert r["source"].rsplit(":", 1)[0].endswith((".jsonl",))
    mcq = [r for r in rows if r["kind"] == "mcq"]
    assert mcq and all(r["answer_gt"] == "B" for r in mcq)
    # asked exactly as `vlmforge eval` asks (the letter protocol's prompt)
    assert mcq[0]["question"] == "<image>\nWhat colour is it?\nA. red\nB. blue\nC. green\nD. yellow\n" \
                                 "Answer with the option's letter from the given choices directly."
    assert all(get_kind("mcq").extract(r["chosen"], _mcq_item()) == "B" for r in mcq)
    drop = [r for r in rows if r["recipe"] == "dropout_ntp"]
    for r in drop:
        words = r["chosen"].split()
        assert r["rejected"] == " ".join(words[: len(words) // 2]) + sampler.ending
        assert r["answer_gt"] == r["chosen"] and r["kind"] == "long_answer"
    c = m["counts"]
    assert c["questions"] == c["questions_asked"] == 12 and c["samples"] == 72 and c["long_answers"] == 6
    per = m["per_task"]
    assert set(per) == {"mcq:mcq", "pope:pope"}
    assert sum(t["pairs"] for t in per.values()) == by["correctness"]
    assert c["questions_no_correct"] == sum(t["no_correct"] for t in per.values())
    assert c["questions_no_incorrect"] == sum(t["no_incorrect"] for t in per.values())
    assert 0 < c["sample_accuracy"] < 1 and m["stage"] == "preference-build" and m["dropped"] == {}
    # whole questions share a generate call; which ones does not change the pairs
    _build(_plan(root), tmp_path / "batched", BuildSettings(samples=6, pairs_per_question=3, questions_per_part=4,
                                                            batch_size=18), StubSampler())
    assert read_pairs(tmp_path / "batched" / "pairs.jsonl")[: by["correctness"]] == rows[: by["correctness"]]
    # each question drew from its own seed
    assert {s for _, _, s in sampler.seen} == {question_seed(0, q.task, q.item.id) for q in _plan(root).questions}


def test_bad_rows_are_skipped_and_counted_with_file_line(tmp_path):
    root = make_questions(tmp_path / "q", n=2, bad=True)
    m = _build(_plan(root), tmp_path / "out", BuildSettings(samples=2), StubSampler())
    assert m["dropped"] == {"invalid JSON": 1, "missing field 'answer'": 2, "image file not found": 1,
                            "path_outside_root": 1, "duplicate id 'm0'": 1, "image decode error": 1,
                            "answer_too_short": 1}
    assert m["counts"]["skipped_rows"] == 8
    where = {k: [e["where"] for e in v] for k, v in m["dropped_examples"].items()}
    mcq = str(root / "mcq.jsonl")
    assert where["invalid JSON"] == [f"{mcq}:3"] and where["path_outside_root"] == [f"{mcq}:6"]
    assert where["image decode error"] == [f"{mcq}:8"] and where["answer_too_short"] == [f"{root / 'long.jsonl'}:3"]
    assert where["missing field 'answer'"] == [f"{mcq}:4", f"{root / 'long.jsonl'}:4"]
    with pytest.raises(TaskError, match=r"mcq.jsonl:3: invalid JSON"):
        _plan(root, strict=True)


def test_resume_after_a_kill_gives_the_uninterrupted_output(tmp_path):
    root = make_questions(tmp_path / "q", n=5)
    settings = BuildSettings(samples=4, questions_per_part=3, batch_size=2)
    whole = StubSampler()
    _build(_plan(root), tmp_path / "whole", settings, whole)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _build(_plan(root), out, settings, StubSampler(kill_after=5))  # dies in the second part
    assert part_path(out, "correctness", 0).is_file() and not part_path(out, "correctness", 1).is_file()
    assert not (out / "pairs.jsonl").exists()
    (out / "parts" / ".correctness-00001.jsonl.tmp999").write_text("half a part")  # what a kill leaves
    again = StubSampler()
    m = _build(_plan(root), out, settings, again)
    assert again.calls == whole.calls - 3  # the first part (3 questions) was not asked again
    assert (out / "pairs.jsonl").read_bytes() == (tmp_path / "whole" / "pairs.jsonl").read_bytes()
    assert not list((out / "parts").glob(".*"))
    assert m["counts"] == json.loads((tmp_path / "whole" / "manifest.json").read_text())["counts"]
    # a finished folder: no sampler needed, same output
    def no_model():
        raise AssertionError("a finished build made a sampler")
    build_preferences(_plan(root), out, settings, no_model, identity={"test": 1}, progress=False)
    # another run's settings in the same folder are refused
    with pytest.raises(Exception, match="different inputs/settings"):
        build_preferences(_plan(root), out, settings, StubSampler, identity={"test": 2}, progress=False)


def test_two_ranks_give_the_one_rank_output(tmp_path):
    root = make_questions(tmp_path / "q", n=5)
    settings = BuildSettings(samples=4, questions_per_part=2, batch_size=2)
    one = _build(_plan(root), tmp_path / "one", settings, StubSampler())
    out = tmp_path / "two"
    plan = _plan(root)
    prepare_folder(out, {"test": 1})
    for rank in (1, 0):  # any order: a part is a function of its inputs only
        build_parts(plan, out, settings, StubSampler, rank=rank, world=2, progress=False)
        names = sorted(p.name for p in (out / "parts").iterdir())
        if rank == 1:
            assert names == ["correctness-00001.jsonl", "correctness-00003.jsonl", "dropout_ntp-00000.jsonl",
                             "dropout_ntp-00002.jsonl"]
    two = merge_parts(plan, out, settings)
    assert (out / "pairs.jsonl").read_bytes() == (tmp_path / "one" / "pairs.jsonl").read_bytes()
    assert two["counts"] == one["counts"] and two["per_task"] == one["per_task"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    root = make_questions(tmp_path / "q", n=2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()

    def err(*argv):
        assert main(["preference", "build", *argv]) == 2
        return capsys.readouterr().err

    assert "nothing to ask" in err("--ckpt", str(ckpt), "--out", str(tmp_path / "o"))
    assert "benchmarks" in err("--ckpt", str(ckpt), "--questions", "synth-mcq", "--out", str(tmp_path / "o"))
    assert "not found" in err("--ckpt", str(tmp_path / "nope"), "--questions", f"mcq:{root / 'mcq.jsonl'}",
                              "--out", str(tmp_path / "o"))
    assert "--temperature must be > 0" in err("--ckpt", str(ckpt), "--questions", f"mcq:{root / 'mcq.jsonl'}",
                                              "--temperature", "0", "--out", str(tmp_path / "o"))
    assert "unknown task kind 'mcx'" in err("--ckpt", str(ckpt), "--questions", f"mcx:{root / 'mcq.jsonl'}",
                                            "--out", str(tmp_path / "o"))
    assert "model.safetensors" in err("--ckpt", str(ckpt), "--questions", f"mcq:{root / 'mcq.jsonl'}",
                                      "--out", str(tmp_path / "o"))


def test_inline_images_of_a_vlmevalkit_tsv_are_saved_with_the_pairs(tmp_path):
    import base64

    (tmp_path / "q").mkdir()
    image = base64.b64encode(_png()).decode()
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer\timage"]
    lines += [f"{i}\tWhat colour is it?\tred\tblue\tgreen\tyellow\tB\t{image if i == 0 else 0}" for i in range(3)]
    (tmp_path / "q" / "bench.tsv").write_text("\n".join(lines) + "\n")
    plan = load_plan(parse_task_specs([f"mcq:{tmp_path / 'q' / 'bench.tsv'}"]))
    m = _build(plan, tmp_path / "out", BuildSettings(samples=8), StubSampler())
    rows = read_pairs(tmp_path / "out" / "pairs.jsonl")
    assert rows and m["image_root"] == str((tmp_path / "out" / "images").resolve())
    assert {r["image"] for r in rows} == {f"{hashlib.sha1(_png()).hexdigest()}.png"}  # one file for the shared image
    assert (tmp_path / "out" / "images" / rows[0]["image"]).read_bytes() == _png()
