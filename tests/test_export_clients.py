"""A `vlmforge export` folder driven the way a transformers client drives it, with transformers alone
(this file imports no vlmforge: the vlmforge side runs in a subprocess, tests/export_clients_world.py).

The client sends content parts (`{"type": "image"}`, `{"type": "text"}`), calls
`processor.apply_chat_template(..., tokenize=True, return_dict=True)` and `model.generate(**inputs)`
with the folder's own generation config, or `pipeline("image-text-to-text")`, and must get exactly
vlmforge's greedy answers on the held-out benchmark questions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
TASK_FILES = {"synth-mcq": "mcq.jsonl", "synth-vqa": "vqa.jsonl", "synth-pope": "pope.jsonl"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_clients")
    done = subprocess.run([sys.executable, str(HERE / "export_clients_world.py"), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def client(world):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = world / "exported"
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model decodes faster on one thread than on shared cores
    yield processor, model
    torch.set_num_threads(threads)


def _cases(world: Path) -> list[dict]:
    """vlmforge's eval answers, each with the client's messages (content parts) and its image."""
    images = {}
    for name in TASK_FILES.values():
        for line in (world / "world" / "eval" / name).read_text().splitlines():
            row = json.loads(line)
            images[row["id"]] = world / "world" / "eval" / row["image"]
    cases = []
    for line in (world / "eval" / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["task"] in TASK_FILES and row["n_images"] == 1 and not row["demos"]
        marker = "<image>\n"
        assert row["prompt"].startswith(marker)  # vlmforge's prompt: the image, a newline, the question
        image = Image.open(images[row["id"].split("#")[0]]).convert("RGB")
        content = [{"type": "image", "image": image}, {"type": "text", "text": row["prompt"][len(marker):]}]
        cases.append({"id": row["id"], "messages": [{"role": "user", "content": content}], "answer": row["prediction"]})
    return cases


def _two_images(world: Path) -> dict:
    two = json.loads((world / "two_images.json").read_text())
    images = [Image.open(p).convert("RGB") for p in two["images"]]
    question = two["prompt"].replace("<image>\n", "")
    assert two["prompt"] == "<image>\n" * len(images) + question
    content = [*({"type": "image", "image": im} for im in images), {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}], "answer": two["answer"], "max_new_tokens": two["max_new_tokens"]}


def _greedy(processor, model, messages, max_new_tokens: int) -> tuple[str, list[int]]:
    import torch

    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens)  # everything else: generation_config.json
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return processor.decode(new, skip_special_tokens=True), new


PARTS_VS_STRING = [
    # (content parts, the string content vlmforge writes for them)
    ([{"type": "image"}, {"type": "text", "text": "What is it?"}], "<image>\nWhat is it?"),
    ([{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}], "<image>\nWhat is it?"),
    ([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}], "<image>\n<image>\nCompare."),
    ([{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "and "}, {"type": "image"}],
     "Look: <image>\nand <image>\n"),
    ([{"type": "text", "text": "no image"}], "no image"),
]


@pytest.mark.parametrize("parts, string", PARTS_VS_STRING, ids=["image-text", "image-newline-text", "two-images",
                                                               "interleaved", "text-only"])
def test_content_parts_render_as_string_content(world, client, parts, string):
    processor, _ = client
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts},
             {"role": "assistant", "content": [{"type": "text", "text": "Two."}]}, {"role": "user", "content": parts}]
    as_string = [{"role": m["role"], "content": string if m["content"] is parts else "Two."} if m["role"] != "system" else m
                 for m in turns]
    for msgs, ref in ((turns[1:2], as_string[1:2]), (turns, as_string)):
        got = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert got == processor.apply_chat_template(ref, add_generation_prompt=True, tokenize=False)


def test_string_content_renders_as_in_training(world, client):
    """The exported template renders string content byte for byte as the training tokenizer's template."""
    from transformers import AutoTokenizer

    processor, _ = client
    trained = AutoTokenizer.from_pretrained(world / "tok", local_files_only=True)
    convs = [
        [{"role": "user", "content": "<image>\nWhat is it?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\n<image>\nQ"},
         {"role": "assistant", "content": "A."}, {"role": "user", "content": "And?"}, {"role": "assistant", "content": "B."}],
    ]
    for msgs in convs:
        for gen in (False, True):
            exported = processor.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert exported == trained.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert exported == processor.tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)


def test_unsupported_content_part_is_refused(client):
    processor, _ = client
    with pytest.raises(Exception, match="content part type video is not supported"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], tokenize=False)


def test_generation_config_names_end_of_turn_and_pad(world, client):
    from transformers import AutoConfig, GenerationConfig

    processor, model = client
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = GenerationConfig.from_pretrained(world / "exported", local_files_only=True)
    assert gen.eos_token_id == [im_end, tok.eos_token_id] and im_end != tok.eos_token_id
    assert gen.pad_token_id == tok.pad_token_id is not None
    assert gen.suppress_tokens == [tok.convert_tokens_to_ids("<image>")] and not gen.do_sample
    assert model.generation_config.eos_token_id == gen.eos_token_id
    cfg = AutoConfig.from_pretrained(world / "exported", local_files_only=True)
    assert cfg.text_config.eos_token_id == gen.eos_token_id and cfg.pad_token_id == tok.pad_token_id


def test_transformers_answers_equal_vlmforge_answers(world, client):
    processor, model = client
    cases = _cases(world)
    limit = json.loads((world / "two_images.json").read_text())["max_new_tokens"]
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    equal, stopped = 0, 0
    for case in cases:
        text, new = _greedy(processor, model, case["messages"], limit)
        equal += text == case["answer"]
        stopped += bool(new) and new[-1] == im_end
    assert len(cases) >= 20
    assert equal == len(cases), f"{equal} of {len(cases)} answers equal vlmforge's ({stopped} ended at <|im_end|>)"
    assert 0 < stopped < len(cases)  # some answers end at <|im_end|> before the limit, some run to it


def test_two_images_answer_equals_vlmforge_generate(world, client):
    processor, model = client
    two = _two_images(world)
    assert _greedy(processor, model, two["messages"], two["max_new_tokens"])[0] == two["answer"]


def test_pipeline_image_text_to_text_answers_equal(world, client):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(world / "exported"), local_files_only=True)
    two = _two_images(world)
    cases = _cases(world)[:4] + [two]
    for case in cases:
        out = pipe(text=case["messages"], max_new_tokens=two["max_new_tokens"], return_full_text=False)
        assert out[0]["generated_text"] == case["answer"]
