"""Export to a transformers LLaVA folder: loads offline with the Auto classes, same logits as ours."""

from __future__ import annotations

import pytest
import torch
from fixtures_model import tiny_model
from PIL import Image

from vlmforge.images import preprocess_batch
from vlmforge.model.decoding import prompt_ids
from vlmforge.model.export import ExportRefused, export_llava
from vlmforge.text.tokenization import load_tokenizer

MSGS = [{"role": "user", "content": "<image>What is in the picture?"}]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.projector.kind=avgpool_mlp",),  # full grid (pool_size null): the SFT shape
        ("model.projector.kind=mlp", "model.vision.feature_layer=-1"),
        ("model.vision.preset=tiny-clip", "model.projector.kind=mlp"),
    ],
    ids=["siglip-avgpool-full", "siglip-last-layer", "clip"],
)
def test_exported_llava_matches_our_logits(tok, tmp_path, overrides):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = tiny_model(tok, *overrides, spread=0.2)
    export_llava(model, tok, tmp_path / "hf")
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    text = proc.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", (90, 70), (200, 30, 40))
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    # the processor expands <image> and preprocesses exactly as we do
    assert inputs["input_ids"][0].tolist() == prompt_ids(model, tok, MSGS, 1)
    ours_pv = preprocess_batch([image], model.preprocess_spec())
    assert (ours_pv - inputs["pixel_values"]).abs().max() <= 1e-5
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(inputs["input_ids"], inputs["pixel_values"])
    assert (theirs - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (("model.projector.pool_size=4",), "has no pooling"),
        (("model.projector.kind=pixel_shuffle_mlp",), "pixel_shuffle_mlp"),
        (("model.positions=v2pe", "model.v2pe_delta=0.25", "model.projector.kind=mlp"), "V2PE"),
    ],
)
def test_unmappable_models_are_refused(tok, tmp_path, overrides, reason):
    model = tiny_model(tok, *overrides)
    with pytest.raises(ExportRefused, match=reason):
        export_llava(model, tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
