"""`vlmforge prm-data`: Monte Carlo step labels on stub policies with known per-prefix correctness,
shared prefixes continued once, the output formats, bad rows, resume after a kill, ranks, and the
whole command on a tiny model."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlmforge.cli import main
from vlmforge.critic.steps import critic_messages, split_steps
from vlmforge.data.sft.records import llava_to_messages
from vlmforge.eval.items import EvalItem, TaskError
from vlmforge.eval.kinds import get_kind
from vlmforge.eval.prompts import user_turn
from vlmforge.eval.specs import parse_task_specs
from vlmforge.rollouts.build import (
    PrmSettings,
    build_parts,
    build_prm_data,
    load_questions,
    merge_parts,
    prepare_folder,
    read_steps,
)
from vlmforge.rollouts.montecarlo import Ask, label_questions, rollout_seed, solution_seed


def _png(rgb=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def make_math(root: Path, n: int = 6, bad: bool = False, name: str = "math.jsonl") -> Path:
    """Math rows (kind math, integer answers) over small images in ROOT/images: "a + b" questions."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        (root / "images" / f"{i}.png").write_bytes(_png((40 * i % 255, 30, 200)))
        a, b = i % 4 + 1, i % 3 + 1
        rows.append({"id": f"q{i}", "image": f"images/{i}.png", "question": f"How many shapes? Count {a} + {b}.",
                     "answer": str(a + b), "answer_type": "integer", "question_type": "free_form"})
    if bad:
        (root / "images" / "broken.png").write_bytes(b"not an image")
        rows += ["{not json", {"id": "noans", "image": "images/0.png", "question": "Count 1 + 1."},
                 {"id": "q0", "image": "images/0.png", "question": "Count 2 + 2.", "answer": "4"},
                 {"id": "dec", "image": "images/broken.png", "question": "Count 1 + 2.", "answer": "3"}]
    _write_jsonl(root / name, rows)
    return root / name


def _judge(item: EvalItem):
    rules = get_kind("math")

    def judge(text):
        s = rules.score_prediction(text, item)
        return s.score >= 1.0, s.extracted

    return judge


def _ask(key: str, answer: str) -> Ask:
    item = EvalItem(id=key, question="How many shapes?", images=[], answer=answer,
                    meta={"answer_type": "integer", "question_type": "free_form"})
    return Ask(key, [{"role": "user", "content": "How many shapes?"}], [], _judge(item))


# -- Monte Carlo labels on a stub with known correctness per prefix -----------------------------------
class TablePolicy:
    """Solution k of a question is ``solutions[key][k]``; continuation j of a prefix reaches the
    right answer iff j < ``hits[prefix]``. Seeds tell it which row is which."""

    def __init__(self, asks, solutions, hits, answers, rollouts, seed=0):
        self.by_seed = {}
        for ask in asks:
            for k, text in enumerate(solutions[ask.key]):
                self.by_seed[solution_seed(seed, ask.key, k)] = ("solution", text)
            for prefix, n in hits[ask.key].items():
                for j in range(rollouts):
                    right = f"The answer is {answers[ask.key]}."
                    self.by_seed[rollout_seed(seed, ask.key, prefix, j)] = (prefix, right if j < n else "So it is 0.")
        self.calls: list[list[tuple[str, int]]] = []

    def __call__(self, prompts, images, prefixes, seeds):
        self.calls.append(list(zip(prefixes, seeds)))
        out = []
        for prefix, seed in zip(prefixes, seeds):
            what, text = self.by_seed[seed]
            assert what == ("solution" if prefix == "" else prefix)  # each row continues its own prefix
            out.append(text)
        return out


S_RIGHT = "There are 2 circles.\n\nThere is 1 square.\n\nThe answer is 3."
S_WRONG = "There are 2 circles.\n\nThere are 2 squares.\n\nThe answer is 4."
SOLUTIONS = {"q1": [S_RIGHT, S_WRONG, "", S_RIGHT],
             "q2": ["Step A.\n\nThe answer is 9.", "The answer is 7.", "7", "I do not know."]}
HITS = {"q1": {"There are 2 circles.\n\n": 2, "There are 2 circles.\n\nThere is 1 square.\n\n": 4,
               "There are 2 circles.\n\nThere are 2 squares.\n\n": 0},
        "q2": {"Step A.\n\n": 1}}
ANSWERS = {"q1": "3", "q2": "7"}


def _label(batch_size=64, rollouts=4):
    asks = [_ask("q1", "3"), _ask("q2", "7")]
    policy = TablePolicy(asks, SOLUTIONS, HITS, ANSWERS, rollouts)
    out, cost = label_questions(asks, policy, solutions=4, rollouts=rollouts, batch_size=batch_size)
    return out, cost, policy


def test_mc_is_the_share_of_right_continuations_and_the_last_step_the_solutions_own_correctness():
    (q1, q2), cost, _ = _label()
    assert [s.steps for s in q1] == [split_steps(S_RIGHT), split_steps(S_WRONG), [], split_steps(S_RIGHT)]
    assert q1[0].mc == [0.5, 1.0, 1.0] and q1[0].labels == ["+", "+", "+"] and q1[0].correct
    assert q1[1].mc == [0.5, 0.0, 0.0] and q1[1].labels == ["+", "-", "-"] and not q1[1].correct
    assert q1[2].steps == [] and q1[2].mc == [] and q1[2].labels == [] and not q1[2].correct  # empty: not labelled
    assert q1[3].mc == q1[0].mc and q1[3].labels == q1[0].labels
    assert q1[1].extracted == 4.0 and q1[0].extracted == 3.0
    # a wrong final answer after a step from which 1 of 4 continuations gets there
    assert q2[0].mc == [0.25, 0.0] and q2[0].labels == ["+", "-"]
    assert [s.mc for s in q2[1:]] == [[1.0], [1.0], [0.0]] and [s.labels for s in q2[1:]] == [["+"], ["+"], ["-"]]
    assert cost.solutions == 8


def test_a_prefix_repeated_in_a_question_is_continued_once():
    _, cost, policy = _label(rollouts=4)
    asked = [row for call in policy.calls for row in call if row[0]]
    # q1: "2 circles" (shared by 3 solutions), the right and the wrong second step; q2: one prefix
    assert len(asked) == cost.rollouts == (3 + 1) * 4 and len(set(asked)) == len(asked)
    assert {p for p, _ in asked} == set(HITS["q1"]) | set(HITS["q2"])
    # saved: S_WRONG's first prefix, both prefixes of the repeated S_RIGHT
    assert cost.rollouts_deduplicated == 3 * 4


def test_solutions_first_then_continuations_in_batch_size_calls_same_labels():
    whole, _, _ = _label(batch_size=64)
    small, _, policy = _label(batch_size=3)
    assert [len(c) for c in policy.calls] == [3, 3, 2, 3, 3, 3, 3, 3, 1]
    assert all(p == "" for c in policy.calls[:3] for p, _ in c) and all(p for c in policy.calls[3:] for p, _ in c)
    assert [[(s.steps, s.mc, s.labels) for s in q] for q in small] == [[(s.steps, s.mc, s.labels) for s in q] for q in whole]


def test_continuations_are_judged_on_prefix_plus_continuation():
    seen = []
    item = EvalItem(id="q", question="?", images=[], answer="5", meta={"answer_type": "integer"})
    judge = _judge(item)

    def recording(text):
        seen.append(text)
        return judge(text)

    ask = Ask("q", [{"role": "user", "content": "?"}], [], recording)

    def policy(prompts, images, prefixes, seeds):
        return ["Two and three.\n\nThe answer is 4." if not p else "The answer is 5." for p in prefixes]

    [[sol]], _ = label_questions([ask], policy, solutions=1, rollouts=2)
    assert sol.mc == [1.0, 0.0] and sol.labels == ["+", "-"]
    assert seen.count("Two and three.\n\nThe answer is 5.") == 2


# -- the build on stub policies --------------------------------------------------------------------
class StubPolicy:
    """Reads "a + b" from the prompt; a solution is 1-4 steps with a right or wrong sum (or empty);
    a continuation is right or wrong by its seed. ``kill_after``: raise on that many-th call."""

    def __init__(self, kill_after: int | None = None):
        self.kill_after = kill_after
        self.calls = 0
        self.rows = 0

    def __call__(self, prompts, images, prefixes, seeds):
        self.calls += 1
        if self.kill_after is not None and self.calls >= self.kill_after:
            raise KeyboardInterrupt("killed")
        self.rows += len(prompts)
        out = []
        for messages, ims, prefix, seed in zip(prompts, images, prefixes, seeds):
            assert len(ims) == messages[-1]["content"].count("<image>")
            a, b = map(int, re.search(r"(\d+) \+ (\d+)", messages[-1]["content"]).groups())
            rng = random.Random(seed)
            got = a + b + rng.choice([0, 0, 1, -1])
            if prefix:
                out.append(f"The answer is {got}.")
                continue
            if rng.random() < 0.1:
                out.append("")
                continue
            steps = [f"I see {a} circles.", f"I see {b} squares.", f"{a} + {b} = {got}.", f"The answer is {got}."]
            out.append("\n\n".join(steps[4 - rng.randint(1, 4):]))
        return out


def _plan(*files, **kw):
    return load_questions(parse_task_specs([f"math:{f}" for f in files]), **kw)


def _build(plan, out, settings, policy, **kw):
    return build_prm_data(plan, out, settings, lambda: policy, identity={"test": 1}, progress=False, **kw)


def test_build_writes_prm_json_steps_jsonl_and_manifest(tmp_path):
    path = make_math(tmp_path / "q", n=6)
    settings = PrmSettings(solutions=4, rollouts=3, questions_per_part=4, batch_size=5)
    m = _build(_plan(path), tmp_path / "out", settings, StubPolicy())
    out = tmp_path / "out"
    records = json.loads((out / "prm.json").read_text())
    steps = read_steps(out / "steps.jsonl")
    root = Path(m["image_root"])
    assert root == (tmp_path / "q").resolve()
    assert len(records) == len(steps) == m["counts"]["solutions"] > 0
    plan = _plan(path)
    questions = {q.item.id: q for q in plan.questions}
    for rec, row in zip(records, steps):
        assert rec["id"] == row["id"] and re.fullmatch(rf"{row['question_id']}-s[0-3]", row["id"])
        assert rec["image"] == row["image"] and (root / rec["image"]).is_file()
        # what `vlmforge sft-index` reads: one image, VisualPRM's conversation with the labels as gpt turns
        messages, images = llava_to_messages(rec)
        assert images == [rec["image"]]
        assert messages == critic_messages(row["question"], row["steps"], row["labels"])
        assert [t["value"] for t in rec["conversations"] if t["from"] == "gpt"] == row["labels"]
        q = questions[row["question_id"]]
        assert row["question"] == user_turn("math", q.item)["content"].replace("<image>\n", "")
        assert len(row["steps"]) == len(row["mc"]) == len(row["labels"]) >= 1
        assert row["labels"] == ["+" if v > 0 else "-" for v in row["mc"]]
        assert row["mc"][-1] == float(row["correct"]) and row["answer"] == q.item.answer
        assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in row["mc"][:-1])  # 3 rollouts each
        assert row["task"] == "math:math" and row["source"].startswith(f"{path}:")
    assert [r["question_id"] for r in steps] == sorted((r["question_id"] for r in steps), key=lambda i: int(i[1:]))
    c = m["counts"]
    assert c["questions"] == c["questions_asked"] == 6 and c["solutions_sampled"] == 24
    empty = c["skipped"].get("empty_solution", 0)
    assert c["solutions"] == 24 - empty and m["dropped"] == c["skipped"]
    assert c["steps"] == sum(len(r["steps"]) for r in steps)
    assert c["minus_share"] == pytest.approx(sum(lab == "-" for r in steps for lab in r["labels"]) / c["steps"])
    per_q = {}
    for r in steps:
        per_q.setdefault(r["question_id"], []).append(r["correct"])
    assert c["questions_all_wrong"] == sum(1 for q in questions if not any(per_q.get(q, [])))
    g = c["generations"]
    assert g["solutions"] == 24
    assert g["rollouts"] + g["rollouts_deduplicated"] == 3 * sum(len(r["steps"]) - 1 for r in steps)
    assert m["stage"] == "prm-data" and m["config"]["rollouts"] == 3


def test_bad_rows_counted_with_file_line_or_one_error_in_strict_mode(tmp_path):
    path = make_math(tmp_path / "q", n=3, bad=True)
    other = make_math(tmp_path / "q", n=2, name="more.jsonl")  # ids q0, q1 again: duplicates across files
    m = _build(_plan(path, other, strict=False), tmp_path / "out", PrmSettings(solutions=2, rollouts=2), StubPolicy(),
               strict=False)
    skipped = dict(m["dropped"])
    skipped.pop("empty_solution", None)
    assert skipped == {"invalid JSON": 1, "missing field 'answer'": 1, "duplicate id 'q0'": 1,
                       "image decode error": 1, "duplicate_question_id": 2}
    where = {k: [e["where"] for e in v] for k, v in m["dropped_examples"].items()}
    assert where["invalid JSON"] == [f"{path}:4"] and where["image decode error"] == [f"{path}:7"]
    assert where["duplicate_question_id"] == [f"{other}:1", f"{other}:2"]
    assert m["counts"]["questions"] == 4 and m["counts"]["questions_asked"] == 3
    with pytest.raises(TaskError, match=r"math.jsonl:4: invalid JSON"):
        _plan(path)
    # strict: the image that does not decode stops the run, naming its line
    _write_jsonl(tmp_path / "img" / "math.jsonl", [json.loads(line) for line in path.read_text().splitlines()[-1:]])
    shutil.copytree(tmp_path / "q" / "images", tmp_path / "img" / "images")
    with pytest.raises(TaskError, match=r"math.jsonl:1: item 'dec': cannot decode image"):
        _build(_plan(tmp_path / "img" / "math.jsonl"), tmp_path / "strict", PrmSettings(), StubPolicy())


def test_resume_after_a_kill_gives_the_uninterrupted_output(tmp_path):
    path = make_math(tmp_path / "q", n=7)
    settings = PrmSettings(solutions=3, rollouts=2, questions_per_part=3, batch_size=4)
    whole = StubPolicy()
    _build(_plan(path), tmp_path / "whole", settings, whole)
    out = tmp_path / "killed"
    first_part = StubPolicy()  # what part 0 (the first 3 questions) costs
    build_parts(_plan(path, limit=3), tmp_path / "probe", settings, lambda: first_part, progress=False)
    with pytest.raises(KeyboardInterrupt):
        _build(_plan(path), out, settings, StubPolicy(kill_after=first_part.calls + 2))  # dies in part 1
    names = sorted(p.name for p in (out / "parts").iterdir())
    assert names == ["prm-00000.jsonl"] and not (out / "prm.json").exists()
    (out / "parts" / ".prm-00001.jsonl.tmp999").write_text("half a part")  # what a kill leaves
    again = StubPolicy()
    m = _build(_plan(path), out, settings, again)
    assert again.rows == whole.rows - first_part.rows  # the first part was not generated again
    for name in ("prm.json", "steps.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not list((out / "parts").glob(".*"))
    assert m["counts"] == json.loads((tmp_path / "whole" / "manifest.json").read_text())["counts"]

    def no_model():
        raise AssertionError("a finished run made a policy")

    build_prm_data(_plan(path), out, settings, no_model, identity={"test": 1}, progress=False)
    with pytest.raises(Exception, match=r"other inputs or settings \(test: 1 -> 2\)"):
        build_prm_data(_plan(path), out, settings, StubPolicy, identity={"test": 2}, progress=False)


def test_two_ranks_give_the_one_rank_output(tmp_path):
    path = make_math(tmp_path / "q", n=7)
    settings = PrmSettings(solutions=3, rollouts=2, questions_per_part=2, batch_size=4)
    one = _build(_plan(path), tmp_path / "one", settings, StubPolicy())
    out = tmp_path / "two"
    plan = _plan(path)
    prepare_folder(out, {"test": 1})
    for rank in (1, 0):  # any order: a part is a function of its questions only
        build_parts(plan, out, settings, StubPolicy, rank=rank, world=2, progress=False)
        if rank == 1:
            assert sorted(p.name for p in (out / "parts").iterdir()) == ["prm-00001.jsonl", "prm-00003.jsonl"]
    two = merge_parts(plan, out, settings)
    for name in ("prm.json", "steps.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert two["counts"] == one["counts"]


def test_inline_images_of_a_tsv_are_saved_under_out_images(tmp_path):
    import base64
    import hashlib

    (tmp_path / "q").mkdir()
    image = base64.b64encode(_png()).decode()
    lines = ["index\tquestion\tanswer\tanswer_type\timage"]
    lines += [f"{i}\tCount {i} + 1.\t{i + 1}\tinteger\t{image if i == 0 else 0}" for i in range(3)]
    (tmp_path / "q" / "bench.tsv").write_text("\n".join(lines) + "\n")
    m = _build(_plan(tmp_path / "q" / "bench.tsv"), tmp_path / "out", PrmSettings(solutions=2, rollouts=2), StubPolicy())
    rows = read_steps(tmp_path / "out" / "steps.jsonl")
    assert rows and m["image_root"] == str((tmp_path / "out" / "images").resolve())
    assert {r["image"] for r in rows} == {f"{hashlib.sha1(_png()).hexdigest()}.png"}  # one file for the shared image
    assert (tmp_path / "out" / "images" / rows[0]["image"]).read_bytes() == _png()


# -- the command on a tiny model -------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """A 64-wide model: one thread beats several contending for a shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def policy_ckpt(tmp_path_factory):
    """A tiny random VLM whose replies often break lines, so solutions have several steps."""
    import torch
    from fixtures_tokenizer import shape_sentences

    from vlmforge.config import load_recipe
    from vlmforge.model.build import build_vlm
    from vlmforge.model.saving import save_vlm
    from vlmforge.text.tokenization import load_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("prm")
    train_tokenizer(shape_sentences(), folder / "tok", vocab_size=512, min_frequency=2)
    tok = load_tokenizer(folder / "tok")
    cfg = load_recipe(None, ["model.projector.pool_size=2"])
    model = build_vlm(cfg.model, tok, seed=0).eval()
    newline = tok.encode("\n", add_special_tokens=False)
    with torch.no_grad():  # one large shared coordinate (tied head: a uniform shift) plus a tilt to "\n" and end of turn
        emb = model.llm.get_input_embeddings().weight
        emb[:, 0] += 10.0
        emb[newline[0], 0] += 0.7
        emb[tok.convert_tokens_to_ids("<|im_end|>"), 0] += 0.35
    save_vlm(model, tok, cfg, folder / "ckpt")
    return folder / "ckpt"


def _args(ckpt, path, *extra):
    return ["prm-data", "--policy", str(ckpt), "--questions", str(path), "--solutions", "2", "--rollouts", "2",
            "--max-new-tokens", "12", "--batch-size", "8", "--questions-per-part", "2", "--device", "cpu", "--quiet",
            *extra]


def test_prm_data_end_to_end_on_a_tiny_model(policy_ckpt, tmp_path, capsys):
    path = make_math(tmp_path / "q", n=4)
    args = _args(policy_ckpt, path)  # FILE alone: kind math
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "solutions" in capsys.readouterr().out
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    c = m["counts"]
    assert c["questions_asked"] == 4 and c["solutions_sampled"] == 8 and c["generations"]["rollouts"] > 0
    records = json.loads((tmp_path / "a" / "prm.json").read_text())
    steps = read_steps(tmp_path / "a" / "steps.jsonl")
    assert len(records) == len(steps) == c["solutions"] and any(len(r["steps"]) > 1 for r in steps)
    for rec, row in zip(records, steps):
        messages, images = llava_to_messages(rec)
        assert (Path(m["image_root"]) / images[0]).is_file()
        assert [x["content"] for x in messages if x["role"] == "assistant"] == row["labels"]
        assert all(v in (0.0, 0.5, 1.0) for v in row["mc"]) and row["mc"][-1] == float(row["correct"])
    # `vlmforge sft-index` takes every row, images under the manifest's image_root
    assert main(["sft-index", "--input", str(tmp_path / "a" / "prm.json"), "--out", str(tmp_path / "idx"),
                 "--image-root", m["image_root"], "--tokenizer", str(policy_ckpt / "tokenizer")]) == 0
    index = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert index["counts"]["records"] == len(records) and not index["dropped"]
    # seeded: another folder gets the same bytes; the finished folder reruns without change
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    for name in ("prm.json", "steps.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert read_steps(tmp_path / "a" / "steps.jsonl") == steps
    # other settings in the same folder: refused in one line naming the change, unless --overwrite
    capsys.readouterr()
    assert main([*args, "--rollouts", "3", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "settings.rollouts: 2 -> 3" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--rollouts", "3", "--overwrite", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]["rollouts"] == 3


def test_cli_bad_rows_strict_by_default_and_other_errors_are_one_line(policy_ckpt, tmp_path, capsys):
    path = make_math(tmp_path / "q", n=2, bad=True)

    def err(*argv):
        assert main(list(argv)) == 2
        e = capsys.readouterr().err
        assert len(e.strip().splitlines()) == 1
        return e

    assert f"{path}:3: invalid JSON" in err(*_args(policy_ckpt, path), "--out", str(tmp_path / "o"))
    assert main([*_args(policy_ckpt, path), "--no-strict", "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["dropped"]["invalid JSON"] == 1 and m["dropped_examples"]["invalid JSON"][0]["where"] == f"{path}:3"
    assert "benchmarks" in err("prm-data", "--policy", str(policy_ckpt), "--questions", "synth-math", "--out", "x")
    assert "checkpoint folder not found" in err(*_args(tmp_path / "nope", path), "--out", str(tmp_path / "p"))
    assert "--temperature must be > 0" in err(*_args(policy_ckpt, path), "--temperature", "0", "--out", "x")
    assert "unknown task kind 'mcx'" in err(*_args(policy_ckpt, f"mcx:{path}"), "--out", "x")
    assert "file not found" in err(*_args(policy_ckpt, tmp_path / "none.jsonl"), "--out", "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("someone's file")
    assert "--overwrite" in err(*_args(policy_ckpt, path), "--no-strict", "--out", str(tmp_path / "busy"))


@pytest.mark.slow
def test_two_gloo_ranks_match_one_rank_on_the_tiny_model(policy_ckpt, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        if shutil.which("torchrun") is None:
            pytest.skip("torchrun not installed")
        torchrun = Path(shutil.which("torchrun"))
    path = make_math(tmp_path / "q", n=5)
    args = _args(policy_ckpt, path)[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "vlmforge", "prm-data", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(["prm-data", *args, "--out", str(tmp_path / "one")]) == 0
    for name in ("prm.json", "steps.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert m1["counts"] == m2["counts"] and m2["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) == [f"prm-0000{i}.jsonl" for i in range(3)]

