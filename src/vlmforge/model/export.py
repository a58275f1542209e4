"""Export a full-grid model to a standard transformers LLaVA folder (LlavaForConditionalGeneration).

Mapping (exact, no approximation): vision tower -> model.vision_tower, projector linear_1/linear_2
(GELU) -> model.multi_modal_projector, LLM -> model.language_model + lm_head. Our feature layer is
transformers' hidden_states index, so it becomes `vision_feature_layer` as is; SigLIP has no CLS
token (strategy "full"), CLIP's CLS is dropped (strategy "default"). What LLaVA cannot express is
refused: pooling, pixel shuffle, V2PE with delta != 1, a tower run off its native resolution,
tiles or a start / end wrap around images (model.images).
For clients: the chat template also renders content parts (text/chat.py client_chat_template) and
generation_config.json stops at the end of the turn, so transformers' greedy answers are ours.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessorPil,
)
from transformers.initialization import no_init_weights

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.model.decoding import end_of_turn_ids
from vlmforge.text.chat import client_chat_template

# The answer length `model.generate(**inputs)` gets without max_new_tokens (vlmforge generate's default).
MAX_NEW_TOKENS = 128


class ExportRefused(ValueError):
    """The model does not map onto LlavaForConditionalGeneration; the message says why."""


def check_exportable(model) -> None:
    why = []
    projector_refusal = model.projector.export_refusal(model.patch_grid)  # each projector kind answers
    if projector_refusal is not None:
        why.append(projector_refusal)
    hidden = model.projector.linear_1.out_features if hasattr(model.projector, "linear_1") else None
    if hidden is not None and hidden != model.llm.config.hidden_size:
        why.append(f"its projector hidden width {hidden} differs from the LLM width {model.llm.config.hidden_size}")
    if model.positions == "v2pe" and model.v2pe_delta != 1.0:
        why.append(f"it uses V2PE positions with delta {model.v2pe_delta}; LLaVA uses integer positions (delta 1)")
    images = model.images
    if images.tiles:
        why.append("it tiles images (model.images.tiles); LLaVA's processor feeds each image as one tile "
                   "(--set model.images.tiles=false exports it untiled)")
    if images.start or images.end:
        why.append("it wraps each image's tokens in model.images.start / end; LLaVA's processor writes the image "
                   "tokens alone")
    if model.image_size != model.vision.config.image_size:
        why.append(
            f"its tower runs at {model.image_size} px with interpolated position embeddings but is configured "
            f"for {model.vision.config.image_size} px"
        )
    if why:
        raise ExportRefused("cannot export to LlavaForConditionalGeneration: " + "; ".join(why))


def llava_config(model, tokenizer=None):
    """The LlavaConfig of `model`; with `tokenizer`, text_config names the end-of-turn ids
    (eos_token_id, as Qwen2.5-Instruct's config does) and the config the pad id (as llava-hf's do)."""
    clip = model.vision.config.model_type == "clip_vision_model"
    text_config = model.llm.config
    text_dict = text_config.to_dict()
    extra = {}
    if tokenizer is not None:
        text_dict["eos_token_id"] = end_of_turn_ids(tokenizer)
        extra["pad_token_id"] = int(tokenizer.pad_token_id)
    return LlavaConfig(
        vision_config=model.vision.config.to_dict(),
        text_config=text_dict,
        image_token_index=model.image_token_id,
        image_seq_length=model.tokens_per_image,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if clip else "full",
        vision_feature_layer=model.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        **extra,
    )


def generation_config(model, tokenizer) -> GenerationConfig:
    """generation_config.json: stop at the end of the turn (<|im_end|>, then EOS if different; vLLM
    reads these too), the pad id, greedy, and never emit the image placeholder (vlmforge's decoding
    rule), so `model.generate(**inputs)` gives vlmforge's greedy answers."""
    return GenerationConfig(
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=int(tokenizer.pad_token_id),
        suppress_tokens=[int(model.image_token_id)],
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
    )


def llava_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.vision.state_dict().items():
        out[f"model.vision_tower.{k}"] = v
    for k, v in model.projector.state_dict().items():
        out[f"model.multi_modal_projector.{k}"] = v
    for k, v in model.llm.base_model.state_dict().items():
        out[f"model.language_model.{k}"] = v
    out["lm_head.weight"] = model.llm.get_output_embeddings().weight
    return out


def image_processor(model):
    spec = model.preprocess_spec()
    s = spec["size"]
    if model.vision.config.model_type == "clip_vision_model":
        return CLIPImageProcessorPil(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s}, do_center_crop=True,
            image_mean=spec["mean"], image_std=spec["std"], rescale_factor=spec["rescale"],
        )
    return SiglipImageProcessorPil(size={"height": s, "width": s}, image_mean=spec["mean"], image_std=spec["std"], rescale_factor=spec["rescale"])


def load_converted(hf_model, state: dict, tied: bool, label: str, dtype: torch.dtype | None = None) -> None:
    """Load a converted state dict into a transformers model built without init: every weight must
    land (a tied head may be absent), then the ties are restored and the model cast to ``dtype``."""
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not tied]
    if missing or unexpected:
        raise RuntimeError(f"{label} weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        hf_model.tie_weights()
    if dtype is not None:
        hf_model.to(dtype)


def export_llava(model, tokenizer, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a folder that `AutoModelForImageTextToText` / `AutoProcessor` load offline."""
    check_exportable(model)
    config = llava_config(model, tokenizer)
    with no_init_weights():
        llava = LlavaForConditionalGeneration(config)
    load_converted(llava, llava_state_dict(model), bool(config.tie_word_embeddings), "LLaVA", dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llava.generation_config = generation_config(model, tokenizer)
    llava.save_pretrained(str(out))
    clip = model.vision.config.model_type == "clip_vision_model"
    processor = LlavaProcessor(
        image_processor=image_processor(model),
        tokenizer=tokenizer,
        patch_size=model.vision.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=client_chat_template(tokenizer.chat_template),  # string content as trained, plus content parts
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if clip else 0,
    )
    processor.save_pretrained(str(out))
    return out
