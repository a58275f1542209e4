"""The lmms-eval plugin (`lmms-eval --model vlmforge --model_args ckpt=PATH --tasks ...`).

The request -> answer adapter is tested without lmms-eval (fake requests, a tiny random checkpoint).
With lmms_eval importable (`pip install 'vlmforge[lmms]'`, or lmms-eval without its dependencies plus
accelerate, datasets, evaluate, loguru, ...), lmms-eval's own evaluator runs two local tasks written
here (generate_until and multiple_choice over a jsonl of images) on the tiny checkpoint, and the
answers must be exactly vlmforge's own generation and likelihoods.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap
from dataclasses import dataclass

import pytest
from fixtures_model import tiny_checkpoint
from PIL import Image

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason="lmms_eval is not installed (optional extra: pip install 'vlmforge[lmms]')")

QUESTIONS = ["What colour is the circle?", "Is there a square?", "How many shapes are there?"]
COLOURS = [(220, 30, 30), (30, 60, 220), (30, 180, 30)]


@pytest.fixture(scope="module", autouse=True)
def _restore_pil_truncation_setting():
    """Importing lmms_eval sets PIL's process-wide LOAD_TRUNCATED_IMAGES; later tests expect truncated
    JPEGs to fail to decode, so put the setting back."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = before


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("lmms_vlm"))


@dataclass
class FakeInstance:
    """What the adapter reads of lmms_eval.api.instance.Instance: ``args``."""

    arguments: tuple

    @property
    def args(self):
        return self.arguments


def _images():
    return [Image.new("RGB", (24, 24), c) for c in COLOURS]


def test_adapter_pieces():
    from vlmforge.eval.lmms_adapter import answer_text, generation_settings, stop_at, user_messages

    assert user_messages("Q?", 1) == [{"role": "user", "content": "<image>\nQ?"}]
    assert user_messages("<image>\nQ?", 1) == [{"role": "user", "content": "<image>\nQ?"}]  # already marked
    assert user_messages("Q?", 2) == [{"role": "user", "content": "<image>\n<image>\nQ?"}]
    assert user_messages("", 0) == [{"role": "user", "content": ""}]
    assert stop_at("red\n\nblue", ["\n\n", "blue"]) == "red" and stop_at("red", []) == "red"
    assert answer_text(" Red") == "Red"
    g = generation_settings({"until": "\n", "max_new_tokens": 5, "temperature": 0.7, "do_sample": False}, 64)
    assert g == {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0, "until": ("\n",)}
    g = generation_settings({"temperature": 0.7, "do_sample": True, "top_p": 0.9}, 64)
    assert g == {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "until": ()}


def test_adapter_rejects_video():
    from vlmforge.errors import UserError
    from vlmforge.eval.lmms_adapter import request_visuals

    assert len(request_visuals(lambda d: [[d["im"]], None], {"im": Image.new("L", (4, 4))})) == 1
    with pytest.raises(UserError, match="images only"):
        request_visuals(lambda d: ["clip.mp4"], {})


def test_adapter_answers_are_vlmforge_answers(tiny_ckpt):
    """Fake lmms-eval requests through the adapter give exactly decoding.generate / answer_logprobs."""
    from vlmforge.eval.lmms_adapter import run_generate_until, run_loglikelihood
    from vlmforge.model import decoding, likelihood

    _, model, tok = tiny_ckpt
    ims = _images()
    docs = {("t", "test", i): {"image": ims[i]} for i in range(3)}
    vis = lambda doc: [doc["image"]]  # noqa: E731
    reqs = [FakeInstance((q, {"max_new_tokens": 6, "until": ["\n\n"]}, vis, i, "t", "test"))
            for i, q in enumerate(QUESTIONS)]
    calls = []

    def gen(prompts, images, **s):
        calls.append(len(prompts))
        return decoding.generate(model, tok, prompts, images, **s)

    got = run_generate_until(reqs, lambda t, s, i: docs[(t, s, i)], gen, batch_size=2)
    assert calls == [2, 1]
    want = decoding.generate(model, tok, [[{"role": "user", "content": f"<image>\n{q}"}] for q in QUESTIONS],
                             [[im] for im in ims], max_new_tokens=6)
    assert got == [stop_at_all(w) for w in want]

    ll_reqs = [FakeInstance((QUESTIONS[0], " red", vis, 0, "t", "test")),
               FakeInstance((QUESTIONS[0], " blue", vis, 0, "t", "test")),
               FakeInstance(("", "red"))]  # acc_mutual_info's unconditional request: no image
    scores = run_loglikelihood(ll_reqs, lambda t, s, i: docs[(t, s, i)],
                               lambda p, i, a: likelihood.answer_logprobs(model, tok, p, i, a), batch_size=2)
    prompt = [{"role": "user", "content": f"<image>\n{QUESTIONS[0]}"}]
    ref = likelihood.answer_logprobs(model, tok, [prompt, prompt, [{"role": "user", "content": ""}]],
                                     [[ims[0]], [ims[0]], []], ["red", "blue", "red"])
    assert [s[0] for s in scores] == pytest.approx([r[0] for r in ref], abs=1e-5)
    assert [s[1] for s in scores] == [r[1] for r in ref]
    assert all(s[0] < 0 for s in scores)


def stop_at_all(text):
    return text.split("\n\n")[0]


def test_answer_logprobs_match_full_forward(tiny_ckpt):
    """answer_logprobs = the sum of the answer tokens' log-probs in one full forward; greedy flag = argmax."""
    import torch

    from vlmforge.model import likelihood
    from vlmforge.model.decoding import prompt_ids

    _, model, tok = tiny_ckpt
    im = _images()[0]
    msgs = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}]
    head = prompt_ids(model, tok, msgs, 1)
    from vlmforge.images import preprocess_batch

    pv = preprocess_batch([im], model.preprocess_spec())
    for answer, eot in (("red", False), ("a blue square", True)):
        tail = tok(answer, add_special_tokens=False)["input_ids"] + ([tok.convert_tokens_to_ids("<|im_end|>")] if eot else [])
        with torch.no_grad():
            logits = model(torch.tensor([head + tail]), pixel_values=pv)[0].float()
        logp = torch.log_softmax(logits, -1)
        want = sum(float(logp[len(head) - 1 + t, x]) for t, x in enumerate(tail))
        logits[:, model.image_token_id] = float("-inf")
        greedy = all(int(logits[len(head) - 1 + t].argmax()) == x for t, x in enumerate(tail))
        (lp, g), = likelihood.answer_logprobs(model, tok, [msgs], [[im]], [answer], end_of_turn=eot)
        assert lp == pytest.approx(want, abs=1e-4) and g == greedy


# -- through lmms-eval's own evaluator ------------------------------------------------------
def _write_tasks(root, n=3):
    """Two local lmms-eval tasks over a jsonl of images: tiny_vqa (generate_until), tiny_mcq (multiple_choice)."""
    data = root / "data"
    data.mkdir(parents=True)
    rows = []
    for i in range(n):
        p = data / f"{i}.png"
        Image.new("RGB", (24, 24), COLOURS[i % 3]).save(p)
        rows.append({"id": i, "image": str(p), "question": QUESTIONS[i % 3], "answer": ["red", "blue", "green"][i % 3],
                     "choices": ["red", "blue", "green"], "label": i % 3})
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_utils.py").write_text(textwrap.dedent('''
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"]

        def process_results(doc, results):
            return {"match": float(results[0].strip().lower() == doc["answer"])}
    '''))
    common = f'''
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data / "test.jsonl"}
          cache_dir: {root / "hf_cache"}
        test_split: test
        doc_to_visual: !function tiny_utils.doc_to_visual
        doc_to_text: !function tiny_utils.doc_to_text
    '''
    (tasks / "tiny_vqa.yaml").write_text(textwrap.dedent(common) + textwrap.dedent('''
        task: tiny_vqa
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 6
          until: ["\\n\\n"]
          temperature: 0
          do_sample: false
        process_results: !function tiny_utils.process_results
        metric_list:
          - metric: match
            aggregation: mean
            higher_is_better: true
    '''))
    (tasks / "tiny_mcq.yaml").write_text(textwrap.dedent(common) + textwrap.dedent('''
        task: tiny_mcq
        output_type: multiple_choice
        doc_to_choice: choices
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
    '''))
    return tasks, rows


@needs_lmms
def test_entry_point_registers_the_model():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points().select(group="lmms_eval.models") if e.name == "vlmforge"]
    if not eps:
        pytest.skip("vlmforge's entry points are not installed: pip install -e . --no-deps")
    from lmms_eval import models

    from vlmforge.eval.lmms_plugin import VlmforgeLMM

    assert models.get_model("vlmforge") is VlmforgeLMM


def skip_filelock_patch(monkeypatch):
    """lmms-eval 0.7.3 patches filelock's private ``filelock._api``, which filelock 4 no longer has;
    the patch only guards datasets' lock re-entry across processes, so a one-process test skips it."""
    import lmms_eval.evaluator as ev

    if importlib.util.find_spec("filelock._api") is None:
        monkeypatch.setattr(ev._enable_reentrant_filelocks, "_patched", True, raising=False)


@needs_lmms
def test_lmms_eval_runs_local_tasks(tmp_path, tiny_ckpt, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlmforge.eval.lmms_plugin import VlmforgeLMM
    from vlmforge.model import decoding, likelihood

    ckpt, model, tok = tiny_ckpt
    skip_filelock_patch(monkeypatch)
    tasks, rows = _write_tasks(tmp_path)
    lm = VlmforgeLMM.create_from_arg_string(f"ckpt={ckpt},device=cpu", {"batch_size": 2})
    out = simple_evaluate(model=lm, tasks=["tiny_vqa", "tiny_mcq"], task_manager=TaskManager(include_path=str(tasks)),
                          log_samples=True, bootstrap_iters=0)
    ims = [Image.open(r["image"]).convert("RGB") for r in rows]
    prompts = [[{"role": "user", "content": f"<image>\n{r['question']}"}] for r in rows]

    want = [stop_at_all(a) for a in decoding.generate(model, tok, prompts, [[im] for im in ims], max_new_tokens=6)]
    samples = sorted(out["samples"]["tiny_vqa"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == want
    match = sum(w.strip().lower() == r["answer"] for w, r in zip(want, rows)) / len(rows)
    assert out["results"]["tiny_vqa"]["match,none"] == pytest.approx(match)

    correct = 0
    for r, p, im in zip(rows, prompts, ims):
        ll = likelihood.answer_logprobs(model, tok, [p] * 3, [[im]] * 3, r["choices"])
        correct += max(range(3), key=lambda j: ll[j][0]) == r["label"]
    assert out["results"]["tiny_mcq"]["acc,none"] == pytest.approx(correct / len(rows))
