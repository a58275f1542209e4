"""Task loading, prompt building, k-shot interleaving, batching and outputs, with a fake model.

The fake "model" looks at the query image (solid colours) and answers from what it sees, so a
right score proves each prompt travelled with its own image and options.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re

import pytest
from PIL import Image

from vlmforge.eval import evaluate
from vlmforge.eval.fewshot import DemoPool, build_messages
from vlmforge.eval.items import TaskError
from vlmforge.eval.runner import headline, summary_table
from vlmforge.eval.specs import TaskSpec, parse_task_specs
from vlmforge.eval.tasks import load_items, load_task

COLORS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
NAMES = list(COLORS)


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), COLORS[color]).save(buf, format="PNG")
    return buf.getvalue()


def _color_of(img) -> str:
    px = img.getpixel((0, 0))
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], px)))


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def world(tmp_path):
    return make_world(tmp_path / "world")


def make_world(root, n: int = 8):
    """The `vlmforge synth` layout: DIR/eval/{mcq,vqa,pope}.jsonl, images in DIR/eval/images/ (paths
    relative to the jsonl's folder); solid-colour images so a fake model can answer."""
    (root / "eval" / "images").mkdir(parents=True)
    mcq, vqa, pope = [], [], []
    for i in range(n):
        color = NAMES[i % 4]
        rel = f"images/{i:03d}.png"
        (root / "eval" / rel).write_bytes(_png(color))
        order = NAMES[i % 4:] + NAMES[: i % 4]
        order = order[1:] + order[:1] if i % 2 else order
        options = dict(zip("ABCD", order))
        answer = next(k for k, v in options.items() if v == color)
        mcq.append({"id": f"m{i}", "image": rel, "question": "What colour is the image?", "options": options,
                    "answer": answer, "category": "colour"})
        vqa.append({"id": f"v{i}", "image": rel, "question": "What colour is the image?",
                    "answers": [color] * 7 + [f"dark {color}"] * 3, "category": "colour"})
        other = NAMES[(i + 1) % 4]
        pope.append({"id": f"p{i}a", "image": rel, "question": f"Is the image {color}?", "answer": "yes", "object": color})
        pope.append({"id": f"p{i}b", "image": rel, "question": f"Is the image {other}?", "answer": "no", "object": other})
    _write_jsonl(root / "eval" / "mcq.jsonl", mcq)
    _write_jsonl(root / "eval" / "vqa.jsonl", vqa)
    _write_jsonl(root / "eval" / "pope.jsonl", pope)
    return root


class FakeModel:
    """Answers from the query image's colour; records every call."""

    def __init__(self, style="oracle"):
        self.style = style
        self.calls = []

    def __call__(self, prompts, images):
        self.calls.append((prompts, images))
        out = []
        for messages, imgs in zip(prompts, images):
            text = messages[-1]["content"]
            color = _color_of(imgs[-1])
            if self.style == "always_a":
                out.append("A")
            elif self.style == "mumble":
                out.append("hmm, hard to say")
            elif "option's letter" in text:
                options = dict(re.findall(r"^([A-Z])\. (.+)$", text, flags=re.M))
                out.append(next(k for k, v in options.items() if v == color))
            elif text.split("\n")[-2].startswith("Is the image"):
                asked = re.search(r"Is the image (\w+)\?", text).group(1)
                out.append("Yes" if asked == color else "No, it is not.")
            else:
                out.append(f"The {color.capitalize()}.")
        return out


# --------------------------------------------------------------------------------- loading


def test_builtin_synth_specs_and_errors(world, tmp_path):
    specs = parse_task_specs("synth", synth_dir=world)
    assert [(s.name, s.kind) for s in specs] == [("synth-mcq", "mmbench"), ("synth-vqa", "vqa"), ("synth-pope", "pope")]
    assert parse_task_specs("synth-vqa,vqa:/x/y.jsonl,mine=pope:z.jsonl", synth_dir=world)[1:] == [
        TaskSpec(name="vqa:y", kind="vqa", path="/x/y.jsonl"), TaskSpec(name="mine", kind="pope", path="z.jsonl")]
    with pytest.raises(TaskError, match="--synth-dir"):
        parse_task_specs("synth-vqa")
    with pytest.raises(TaskError, match="unknown task kind"):
        parse_task_specs("nope:file.jsonl")
    with pytest.raises(TaskError, match="unique"):
        parse_task_specs("vqa:a.jsonl,vqa:a.jsonl")


def test_yaml_task_file(world, tmp_path):
    (tmp_path / "tasks.yaml").write_text(
        f"- name: colours\n  kind: mcq\n  path: {world}/eval/mcq.jsonl\n"
        "- {kind: vqa, path: elsewhere/vqa.jsonl, image_root: world/eval}\n"
    )
    specs = parse_task_specs(str(tmp_path / "tasks.yaml"))
    assert [s.name for s in specs] == ["colours", "vqa:vqa"]
    assert specs[1].path == str(tmp_path / "elsewhere/vqa.jsonl")
    assert specs[1].image_root == str(tmp_path / "world/eval")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/vqa.jsonl").write_text((world / "eval/vqa.jsonl").read_text())
    assert len(load_task(specs[1]).items) == 8


def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(world):
    path = world / "eval" / "bad.jsonl"
    good = json.loads((world / "eval" / "vqa.jsonl").read_text().splitlines()[0])
    path.write_text(
        json.dumps(good) + "\n"
        + "{not json\n"
        + json.dumps({**good, "id": "x2", "question": ""}) + "\n"
        + json.dumps({**good, "id": "x3", "image": "images/missing.png"}) + "\n"
        + json.dumps({**good, "id": "x4", "answers": []}) + "\n"
    )
    with pytest.raises(TaskError, match=r"bad\.jsonl:2: invalid JSON"):
        load_items(path, "vqa")
    items, skipped = load_items(path, "vqa", strict=False)
    assert [it.id for it in items] == ["v0"]
    assert skipped == {"invalid JSON": 1, "missing field 'question'": 1, "image file not found": 1, "'answers' is empty": 1}
    path.write_text(json.dumps({**json.loads((world / "eval" / "mcq.jsonl").read_text().splitlines()[0]), "answer": "Z"}) + "\n")
    with pytest.raises(TaskError, match=r"bad\.jsonl:1: answer 'Z' is neither"):
        load_items(path, "mcq")


def _b64(color):
    return base64.b64encode(_png(color)).decode()


def test_vlmevalkit_tsv_base64_image_references_and_circular_rows(tmp_path):
    path = tmp_path / "MMBench_TINY.tsv"
    cols = ["index", "question", "hint", "A", "B", "C", "answer", "category", "image"]
    rows = [
        # two questions; the second reuses the first's image by index; then circular copies (+1e6)
        [0, "What colour?", "", "red", "green", "blue", "A", "attr", _b64("red")],
        [1, "Which is not red?", "Look closely.", "red", "green", "", "B", "attr", "0"],
        [1000000, "What colour?", "", "green", "blue", "red", "C", "attr", "0"],
        [2000000, "What colour?", "", "blue", "red", "green", "B", "attr", "0"],
        [1000001, "Which is not red?", "Look closely.", "green", "red", "", "A", "attr", "0"],
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        w.writerows(rows)
    task = load_task(TaskSpec("mmb", "mmbench", str(path)))
    assert [it.id for it in task.items] == ["0", "1", "1000000", "2000000", "1000001"]  # file's own rotations kept
    assert [it.group for it in task.items] == ["0", "1", "0", "0", "1"]
    assert task.items[1].options == {"A": "red", "B": "green"} and task.items[1].hint == "Look closely."
    assert _color_of(task.items[1].images[0].load()) == "red"  # resolved through the index reference
    res = evaluate(tasks=[task], generate_fn=lambda p, i: ["A", "B", "C", "B", "A"][: len(p)], batch_size=8, progress=False)
    assert res["mmb"]["metrics"]["circular_accuracy"] == 1.0 and res["mmb"]["metrics"]["n_questions"] == 2
    # limit counts questions, not rows
    assert len(load_task(TaskSpec("mmb", "mmbench", str(path)), limit=1).items) == 3
    with open(path, "a", newline="") as f:
        csv.writer(f, delimiter="\t").writerow([2, "Q?", "", "x", "y", "", "A", "attr", "77"])
    with pytest.raises(TaskError, match=r"MMBench_TINY\.tsv:7: image refers to row index '77'"):
        load_task(TaskSpec("mmb", "mmbench", str(path)))


def test_parquet_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": ["a", "b"],
        "image": [{"bytes": _png("red"), "path": None}, {"bytes": _png("blue"), "path": None}],
        "question": ["Is it red?", "Is it red?"],
        "answer": ["Yes", "no"],
    })
    pq.write_table(table, tmp_path / "pope.parquet")
    items, _ = load_items(tmp_path / "pope.parquet", "pope")
    assert [it.answer for it in items] == ["yes", "no"]
    assert _color_of(items[1].images[0].load()) == "blue"


# ----------------------------------------------------------------------------------- runner


def test_evaluate_oracle_and_outputs(world, tmp_path):
    fake = FakeModel()
    out = tmp_path / "out"
    res = evaluate(tasks="synth", synth_dir=world, generate_fn=fake, batch_size=3, out_dir=out, progress=False)
    assert res["synth-mcq"]["metrics"]["circular_accuracy"] == 1.0
    assert res["synth-mcq"]["counts"] == {"n": 32, "unresolved": 0, "skipped_rows": 0}  # 8 questions x 4 rotations
    assert res["synth-vqa"]["metrics"]["vqa_accuracy"] == 1.0  # "The Red." normalises to "red"
    assert res["synth-pope"]["metrics"]["f1"] == 1.0 and res["synth-pope"]["metrics"]["yes_ratio"] == 0.5
    assert res["synth-mcq"]["chance"]["accuracy"] == 0.25 and res["synth-pope"]["chance"]["accuracy"] == 0.5
    # batching: ceil(32/3) + ceil(8/3) + ceil(16/3) calls, none larger than the batch size
    assert len(fake.calls) == 11 + 3 + 6 and max(len(p) for p, _ in fake.calls) == 3
    # prompts: LLaVA formats, one image marker per image
    mcq_prompt = fake.calls[0][0][0]
    assert mcq_prompt == [{"role": "user", "content": "<image>\nWhat colour is the image?\nA. red\nB. green\n"
                           "C. blue\nD. yellow\nAnswer with the option's letter from the given choices directly."}]
    assert fake.calls[11][0][0][-1]["content"].endswith("\nAnswer the question using a single word or phrase.")
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"synth-mcq", "synth-vqa", "synth-pope"}
    assert results["settings"]["batch_size"] == 3
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 32 + 8 + 16
    assert {"task", "id", "prompt", "prediction", "extracted", "correct", "score"} <= set(preds[0])
    assert all(p["correct"] for p in preds)
    assert (out / "manifest.json").is_file()
    assert "synth-mcq" in summary_table(res)
    assert headline(res)["synth-pope"] == {"metric": "f1", "score": 1.0, "std": None, "chance": pytest.approx(2 / 3),
                                           "n": 16, "unresolved": 0}


def test_always_a_fails_circular_eval(world):
    res = evaluate(tasks="synth-mcq", synth_dir=world, generate_fn=FakeModel("always_a"), progress=False)
    m = res["synth-mcq"]["metrics"]
    assert m["circular_accuracy"] == 0.0 and 0 < m["accuracy"] < 1


def test_unresolved_answers_are_counted_and_wrong(world):
    res = evaluate(tasks="synth-mcq,synth-pope", synth_dir=world, generate_fn=FakeModel("mumble"), progress=False)
    assert res["synth-mcq"]["counts"]["unresolved"] == 32 and res["synth-mcq"]["metrics"]["accuracy"] == 0.0
    pope = res["synth-pope"]
    assert pope["counts"]["unresolved"] == 16 and pope["metrics"]["accuracy"] == 0.0 and pope["metrics"]["yes_ratio"] == 0.0


def test_kshot_prompts_hold_exactly_k_demonstration_images(world):
    fake = FakeModel()
    res = evaluate(tasks="synth-vqa,synth-mcq", synth_dir=world, generate_fn=fake, shots=[0, 2], seeds=[0, 1, 2],
                   batch_size=4, progress=False, limit=6)
    for prompts, images in fake.calls:
        for messages, imgs in zip(prompts, images):
            n_markers = sum(m["content"].count("<image>") for m in messages)
            demos = [m for m in messages if m["role"] == "assistant"]
            assert n_markers == len(imgs) == len(demos) + 1  # k demonstration images + the query's
            assert len(demos) in (0, 2)
            assert [m["role"] for m in messages] == ["user", "assistant"] * len(demos) + ["user"]
            # every demonstration shows its own image, none is the query's image
            assert all(_color_of(img) in COLORS for img in imgs)
    # each demonstration's answer is right for its own image (answers interleaved with their images)
    for prompts, images in fake.calls:
        for messages, imgs in zip(prompts, images):
            for j, m in enumerate(m for m in messages if m["role"] == "assistant"):
                user = messages[2 * j]["content"]
                if "option's letter" in user:
                    options = dict(re.findall(r"^([A-Z])\. (.+)$", user, flags=re.M))
                    assert options[m["content"]] == _color_of(imgs[j])
                else:
                    assert m["content"] == _color_of(imgs[j])
    assert set(res) == {"synth-vqa", "synth-vqa@2shot", "synth-mcq", "synth-mcq@2shot"}
    r = res["synth-vqa@2shot"]
    assert r["seeds"] == [0, 1, 2] and len(r["per_seed"]) == 3 and r["std"]["vqa_accuracy"] == 0.0
    assert r["metrics"]["vqa_accuracy"] == 1.0 and r["shots"] == 2


def test_demo_pool_excludes_query_image_and_rotations(world):
    task = load_task(parse_task_specs("synth-mcq", world)[0])
    pool = DemoPool(task.items)
    assert len(pool.items) == 8  # one per question, not per rotation
    query = task.items[5]  # a rotation of question m1
    for seed in range(5):
        demos = pool.sample(query, 3, seed)
        assert len({d.id for d in demos}) == 3
        assert all(d.group != query.group and d.images[0].key() != query.images[0].key() for d in demos)
    assert pool.sample(query, 3, 7) == pool.sample(query, 3, 7)  # reproducible
    with pytest.raises(ValueError, match="support set has only"):
        pool.sample(query, 8, 0)
    messages, refs = build_messages("mmbench", task.scorer, query, pool.sample(query, 2, 0))
    assert len(refs) == 3 and len(messages) == 5


def test_undecodable_image_strict_and_lenient(world):
    (world / "eval" / "images" / "000.png").write_bytes(b"<html>not an image</html>")
    with pytest.raises(TaskError, match="cannot decode image"):
        evaluate(tasks="synth-vqa", synth_dir=world, generate_fn=FakeModel(), progress=False)
    res = evaluate(tasks="synth-vqa", synth_dir=world, generate_fn=FakeModel(), strict=False, progress=False)
    assert res["synth-vqa"]["counts"]["n"] == 7 and res["synth-vqa"]["skipped"] == {"image decode error": 1}


def test_vqa_tsv_with_list_answers_and_math_jsonl(tmp_path):
    path = tmp_path / "TextVQA_TINY.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "answer"])
        w.writerow([5, _b64("blue"), "What colour?", str(["blue"] * 9 + ["navy"])])
    items, _ = load_items(path, "vqa")
    assert items[0].answers == ["blue"] * 9 + ["navy"] and items[0].id == "5"

    (tmp_path / "b.png").write_bytes(_png("blue"))
    _write_jsonl(tmp_path / "math.jsonl", [
        {"id": "n", "image": "b.png", "question": "How many?", "answer": "3"},
        {"id": "f", "image": "b.png", "question": "Ratio?", "answer": "1.50", "answer_type": "float", "precision": 1},
        {"id": "c", "image": "b.png", "question": "Which?", "choices": ["cat", "dog"], "answer": "dog"},
    ])
    seen = []

    def fake(prompts, images):
        seen.extend(p[-1]["content"] for p in prompts)
        return ["The answer is 3.", "1.46", "B"]

    res = evaluate(tasks=f"math:{tmp_path / 'math.jsonl'}", generate_fn=fake, progress=False)
    assert res["math:math"]["metrics"]["accuracy"] == 1.0
    assert seen[0].endswith("single integer number.") and seen[1].endswith("with 1 decimal place.")
    assert seen[2] == "<image>\nWhich?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."


def test_builtin_tasks_on_a_real_synth_world(tmp_path):
    """`vlmforge synth` output loads as the built-in tasks; answering each item's reference scores 1."""
    from vlmforge.cli import main
    from vlmforge.eval.prompts import user_turn

    sets = ["synth.num_captions=20", "synth.samples_per_shard=20", "synth.num_sft=4", "synth.num_mcq=6",
            "synth.num_vqa=6", "synth.num_pope_images=3", "synth.num_preference=2", "synth.num_text=4"]
    assert main(["synth", "--out", str(tmp_path / "w"), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    tasks = [load_task(s) for s in parse_task_specs("synth", tmp_path / "w")]
    assert [t.name for t in tasks] == ["synth-mcq", "synth-vqa", "synth-pope"]
    # Items are generated in order: the oracle replays each one's reference answer.
    expected = [(user_turn(t.kind, it)["content"], t.scorer.demo_answer(it)) for t in tasks for it in t.items]
    oracle = iter(expected)

    def answer(prompts, images):
        replies = []
        for messages in prompts:
            content, reply = next(oracle)
            assert messages[-1]["content"] == content
            replies.append(reply)
        return replies

    res = evaluate(tasks=tasks, generate_fn=answer, progress=False)
    assert {name: r["metrics"][r["primary"]] for name, r in res.items()} == {"synth-mcq": 1.0, "synth-vqa": 1.0, "synth-pope": 1.0}
    assert {"f1/random", "f1/popular", "f1/adversarial"} <= set(res["synth-pope"]["metrics"])


def test_likelihood_protocol_ranks_option_texts_without_listing_them(world, tmp_path):
    """SEED-Bench style: the question is asked open (no options in the prompt), the option text
    the ranker scores highest is the answer; results land under NAME@likelihood next to the
    generate protocol's."""
    seen = []

    def rank(prompts, images, candidates):  # prefers the image's colour, then the first option
        seen.extend(p[-1]["content"] for p in prompts)
        return [[1.0 if c == _color_of(ims[-1]) else -float(j) for j, c in enumerate(cs)]
                for ims, cs in zip(images, candidates)]

    out = tmp_path / "out"
    res = evaluate(tasks="synth-mcq", synth_dir=world, generate_fn=FakeModel("always_a"), rank_fn=rank,
                   mc_protocols=["generate", "likelihood"], progress=False, out_dir=out)
    assert res["synth-mcq"]["metrics"]["circular_accuracy"] == 0.0  # always "A"
    lik = res["synth-mcq@likelihood"]
    assert lik["metrics"]["circular_accuracy"] == 1.0 and lik["protocol"] == "likelihood"
    assert seen and all("A." not in p and p.endswith("Answer the question using a single word or phrase.") for p in seen)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    ranked = [p for p in preds if p.get("protocol") == "likelihood"]
    # each question once: the rotations of a prompt without options would all rank alike
    assert len(ranked) == 8 and set(ranked[0]["option_logprobs"]) == {"A", "B", "C", "D"}
    assert lik["chance"]["circular_accuracy"] == 0.25
    # a ranker that always prefers the first listed option is right exactly when A is the answer
    res = evaluate(tasks="synth-mcq", synth_dir=world, rank_fn=lambda p, i, cs: [[-float(j) for j in range(len(c))] for c in cs],
                   generate_fn=FakeModel(), mc_protocols=["likelihood"], progress=False)
    assert set(res) == {"synth-mcq@likelihood"}
    answers = [json.loads(line)["answer"] for line in (world / "eval" / "mcq.jsonl").read_text().splitlines()]
    assert res["synth-mcq@likelihood"]["metrics"]["accuracy"] == answers.count("A") / len(answers)
    with pytest.raises(TaskError, match="protocols"):
        evaluate(tasks="synth-mcq", synth_dir=world, generate_fn=FakeModel(), mc_protocols=["vibes"], progress=False)
