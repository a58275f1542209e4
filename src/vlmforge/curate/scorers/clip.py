"""``clip`` / ``dfn`` scorers: cosine similarity of image and text embeddings.

Any transformers contrastive image-text model folder or hub id (CLIPModel, SiglipModel, or a
filtering network written by ``curate train-filter``, which is one of those): loaded with
``AutoModel`` + ``AutoImageProcessor`` + ``AutoTokenizer``, ``trust_remote_code`` off by default.

Text is tokenised the way each family was trained: SigLIP pads to a fixed length and pools the
last position (no attention mask); CLIP pads to the batch and pools the first EOS, with a mask.

Pixels: the processor's steps done directly (:mod:`vlmforge.curate.scorers.clip_pixels`,
bit-identical values, checked at load; ``pixels="processor"`` or a processor it does not reproduce:
transformers' processor itself). ``draft=True`` (opt-in) also decodes JPEGs at a reduced DCT scale
(:func:`vlmforge.curate.io.decode_scaled`): less decode and resize work, slightly other pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from vlmforge.config.curate import ScoreConfig
from vlmforge.curate.scorers.clip_pixels import processor_pixels
from vlmforge.dist import resolve_device
from vlmforge.errors import UserError

# The weights' dtype during scoring, by the names curate.score.dtype takes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# auto: the processor's steps done directly when they reproduce it exactly; processor: always transformers'
PIXEL_PATHS = ("auto", "processor")


def features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (older transformers) or an output with ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def is_siglip(model) -> bool:
    return "siglip" in getattr(model.config, "model_type", "")


def text_inputs(tokenizer, captions: list[str], siglip: bool, max_len: int) -> dict:
    captions = [c or "" for c in captions]
    if siglip:
        enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"]}
    enc = tokenizer(captions, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def load_contrastive(path: str, trust_remote_code: bool = False, dtype=torch.float32):
    try:
        model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a CLIP/SigLIP model from {path!r}: {e}") from None
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise UserError(f"{path}: {type(model).__name__} is not a contrastive image-text model (CLIP / SigLIP)")
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, image_processor, tokenizer


class ContrastiveScorer:
    names = ("clip", "dfn")  # dfn: a filtering network written by `curate train-filter` (same model class)

    @classmethod
    def from_config(cls, name: str, score_cfg: ScoreConfig) -> ContrastiveScorer:
        return cls(score_cfg.model, device=score_cfg.device, dtype=score_cfg.dtype,
                   trust_remote_code=score_cfg.trust_remote_code, name=name,
                   save_embeddings=score_cfg.save_embeddings, draft=bool(score_cfg.draft_decode))

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "float32",
                 trust_remote_code: bool = False, name: str = "clip", save_embeddings: bool = False,
                 pixels: str = "auto", draft: bool = False):
        if pixels not in PIXEL_PATHS:
            raise UserError(f"pixels={pixels!r}: choose from {', '.join(PIXEL_PATHS)}")
        self.name = name
        self.save_embeddings = save_embeddings
        self.model_path = model_path
        self.device = resolve_device(device)
        self.model, self.image_processor, self.tokenizer = load_contrastive(
            model_path, trust_remote_code, DTYPES[dtype]
        )
        self.model.to(self.device)
        self.siglip = is_siglip(self.model)
        self.max_len = int(self.model.config.text_config.max_position_embeddings)
        self.dtype = DTYPES[dtype]
        self.pixels = processor_pixels(self.image_processor) if pixels == "auto" else None
        if draft and self.pixels is None:
            raise UserError(f"curate.score.draft_decode: {model_path}'s {type(self.image_processor).__name__} is not "
                            "one whose steps vlmforge reproduces (or pixels='processor' was asked); score without it")
        # what curate score's readers pass to decode_scaled: None = a full decode (also without a resize)
        self.decode_size = self.pixels.draft_size() if draft else None
        self.draft = self.decode_size is not None

    def info(self) -> dict:
        info = {"scorer": self.name, "model": self.model_path, "model_class": type(self.model).__name__,
                "score": "cosine(image_embedding, text_embedding)"}
        if self.draft:  # other pixels than a full decode: a run folder must not mix the two
            info["decode"] = f"jpeg draft >= {self.decode_size[0]}x{self.decode_size[1]}"
        return info

    # workers: preprocessing only
    def prepare(self, images: list, captions: list[str]) -> dict:
        if self.pixels is not None and all(getattr(im, "mode", None) == "RGB" for im in images):
            pix = self.pixels.batch(images)
        else:  # other modes: the processor's own RGB conversion
            pix = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pix, **text_inputs(self.tokenizer, captions, self.siglip, self.max_len)}

    @torch.inference_mode()
    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pix = batch["pixel_values"].to(self.device, self.dtype)
        txt = {k: v.to(self.device) for k, v in batch.items() if k != "pixel_values"}
        img = features(self.model.get_image_features(pixel_values=pix)).float()
        tx = features(self.model.get_text_features(**txt)).float()
        return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(tx, dim=-1)

    def score(self, batch: dict) -> dict:
        img, tx = self.embed(batch)
        cols = {"score": (img * tx).sum(-1).cpu().numpy().astype(np.float32)}
        if self.save_embeddings:
            cols["image_embedding"] = [row for row in img.cpu().numpy().astype(np.float16)]
        return cols

    @torch.inference_mode()
    def bare_forward(self, batch: dict) -> torch.Tensor:
        """The model's own forward on a prepared batch (bench baseline)."""
        pix = batch["pixel_values"].to(self.device, self.dtype)
        txt = {k: v.to(self.device) for k, v in batch.items() if k != "pixel_values"}
        return self.model(pixel_values=pix, **txt).logits_per_image
