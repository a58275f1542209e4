"""Build a VisionLanguageModel from the recipe's model section (random tiny presets or from_pretrained)."""

from __future__ import annotations

import contextlib

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from vlmforge.arch.presets import llm_config
from vlmforge.arch.projectors import build_projector
from vlmforge.config.model import ModelConfig
from vlmforge.errors import ConfigError
from vlmforge.model.attention import flash_available
from vlmforge.model.tower import build_vision_tower
from vlmforge.model.vlm import VisionLanguageModel
from vlmforge.text.tokenization import image_token_id as tokenizer_image_id


def _llm_attn_implementation(model_cfg: ModelConfig) -> str:
    backend = model_cfg.attn_backend
    if backend == "auto":
        return "flash_attention_2" if flash_available(torch.device("cuda")) and torch.cuda.is_available() else "sdpa"
    if backend in ("sdpa", "eager", "flash_attention_2"):
        return backend
    raise ConfigError(f"model.attn_backend {backend!r} is not one of auto, sdpa, eager, flash_attention_2")


def build_llm(model_cfg: ModelConfig, vocab_size: int | None = None) -> nn.Module:
    """A transformers causal LM. Random init from a preset: vocab = len(tokenizer) exactly.
    Pretrained: embeddings grow only if the tokenizer is longer (e.g. the added `<image>`)."""
    impl = _llm_attn_implementation(model_cfg)
    trc = bool(model_cfg.trust_remote_code)
    if model_cfg.llm.pretrained:
        if model_cfg.llm.qk_init_std is not None:
            raise ConfigError("model.llm.qk_init_std only applies to a randomly initialised LM (preset), "
                              f"not to pretrained {model_cfg.llm.pretrained!r}")
        llm = AutoModelForCausalLM.from_pretrained(
            model_cfg.llm.pretrained, trust_remote_code=trc, attn_implementation=impl, dtype=torch.float32
        )
        if vocab_size is not None and vocab_size > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(vocab_size)
        return llm
    cfg = llm_config(model_cfg.llm, trust_remote_code=trc)
    if vocab_size is not None:
        cfg.vocab_size = vocab_size
    llm = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, trust_remote_code=trc, dtype=torch.float32)
    if model_cfg.llm.qk_init_std is not None:
        init_query_key_(llm, float(model_cfg.llm.qk_init_std))
    return llm


def init_query_key_(llm: nn.Module, std: float) -> None:
    """Re-draw every attention layer's query and key projection weights from N(0, std^2).
    Attention logits are bilinear in W_Q and W_K, so with small weights a content lookup gets
    almost no gradient until both grow: the loss sits on a plateau (the saddle of a product of
    small matrices) whose length shrinks as the initial scale grows."""
    if std <= 0:
        raise ConfigError(f"model.llm.qk_init_std must be > 0, got {std}")
    projections = [m for name, m in llm.named_modules() if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj")]
    if not projections:
        raise ConfigError(f"model.llm.qk_init_std: no q_proj/k_proj modules in {type(llm).__name__}")
    with torch.no_grad():
        for proj in projections:
            proj.weight.normal_(0.0, std)


def build_vlm(
    model_cfg: ModelConfig,
    tokenizer=None,
    image_token_id: int | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    resize_vocab: bool = True,
) -> VisionLanguageModel:
    """Vision tower + projector + LLM from `model_cfg` (the recipe's `model` section).

    `tokenizer` sizes the vocabulary and gives the `<image>` id; without one (e.g. model-info on
    the meta device) the preset's vocab is kept and `image_token_id` defaults to vocab - 1.
    `seed` makes random initialisation reproducible (same weights on every rank).
    `resize_vocab=False` keeps the architecture's vocab (rebuilding a saved checkpoint).
    """
    vocab = len(tokenizer) if tokenizer is not None and resize_vocab else None
    if tokenizer is not None and image_token_id is None:
        image_token_id = tokenizer_image_id(tokenizer)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    dev = torch.device(device) if device is not None else contextlib.nullcontext()
    with rng, dev:
        if seed is not None:
            torch.manual_seed(seed)
        vision = build_vision_tower(model_cfg.vision)
        llm = build_llm(model_cfg, vocab)
        projector = build_projector(model_cfg.projector, vision.config.hidden_size, llm.config.hidden_size)
    if getattr(llm.config, "tie_word_embeddings", False):
        llm.tie_weights()  # also when init was skipped (meta device, no_init_weights)
    if image_token_id is None:
        image_token_id = llm.get_input_embeddings().num_embeddings - 1
    n_emb = llm.get_input_embeddings().num_embeddings
    if image_token_id >= n_emb or (tokenizer is not None and len(tokenizer) > n_emb):
        raise ConfigError(
            f"the tokenizer ({len(tokenizer) if tokenizer is not None else '?'} tokens, <image> = {image_token_id}) "
            f"does not fit the LLM's {n_emb} embeddings"
        )
    model = VisionLanguageModel(vision, projector, llm, model_cfg, image_token_id)
    model.use_flash = llm.config._attn_implementation == "flash_attention_2"
    return model


def build_meta_vlm(model_cfg) -> VisionLanguageModel:
    """The recipe's architecture on the meta device (no memory, no weights, no download): what
    model-info and the planner count."""
    arch = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    arch.vision.pretrained = None  # architecture only: the shipped preset config
    arch.llm.pretrained = None
    arch.attn_backend = "sdpa"
    with no_init_weights():
        return build_vlm(arch, device=torch.device("meta"))
