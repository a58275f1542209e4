"""Parameter counts per component and model FLOPs of a training step.

Model FLOPs (as in MFU: what the model needs, not what an implementation happens to run; no
recompute from activation checkpointing or the chunked loss):

- matmuls: ``f * N`` per token through a component, N = its parameters without embedding lookups
  (token and position embeddings), f = 6 when its weights train (2 forward, 4 backward), 4 when
  they are frozen but gradients must pass through them to something trainable before them, 2 when
  nothing before them trains (forward only). The LLM's N = every decoder layer, the final norm
  and the head (counted even when it is tied to the embedding, since it is a matmul).
- attention (PaLM's convention): ``a * layers * heads * head_dim * sum(S^2)`` over the spans S of
  tokens that attend to each other, a = 12 with a backward through it, 4 forward only. A span is
  each packed document under document attention and the row's real tokens under causal
  attention; with preference branches a span of prompt P, chosen C and rejected R counts
  (P+C)^2 + (P+R)^2 - P^2 (both responses see the prompt, not each other).
- the vision tower per image: ``f * N * patches + a * layers * hidden * patches^2`` over the blocks
  up to the feature layer (f = 2 / a = 4 when frozen, 6 / 12 when trained); the projector
  ``f * N`` per visual token it outputs (f by the same rule as the LLM's).

Only real tokens count (seq_id >= 0); images count once each (a pair's image is encoded once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmforge.model.tower import has_cls_token, inner, is_clip, layers_used, patch_embedding

FORMULA = (
    "per LLM token f*N + a*layers*heads*head_dim*S (S = tokens of its attention span; a step sums "
    "a*layers*heads*head_dim*S^2 per span); N = non-embedding params + head; f = 6 trained / 4 frozen with a "
    "trainable input / 2 forward only; a = 12 with backward / 4 forward only. Per image: vision f*N per patch "
    "+ attention, projector f*N per visual token"
)


@dataclass
class ComponentCount:
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def _unique(params):
    seen = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def count_parameters(module) -> ComponentCount:
    tr = fr = 0
    for p in _unique(module.parameters()):
        if p.requires_grad:
            tr += p.numel()
        else:
            fr += p.numel()
    return ComponentCount(tr, fr)


def _numel(modules) -> int:
    return sum(p.numel() for p in _unique(p for m in modules for p in m.parameters()))


def _matmul_factor(trains: bool, upstream_trains: bool) -> int:
    return 6 if trains else (4 if upstream_trains else 2)


@dataclass(frozen=True)
class FlopsCounts:
    """What the FLOPs of a step depend on, read once from the model."""

    llm_params: int  # N of the LLM: decoder layers + final norm + head
    llm_factor: int
    llm_attention: int  # layers * heads * head_dim
    attention_factor: int
    vision_params: int  # N of the tower's blocks up to the feature layer + patch embedding (+ CLIP pre-norm)
    vision_factor: int
    vision_attention: int  # blocks used * hidden
    vision_attention_factor: int
    patches: int  # per image (CLIP: + the class token)
    projector_params: int
    projector_factor: int
    tokens_per_image: int
    attention_mode: str  # "document" or "causal"

    @property
    def per_image(self) -> int:
        """Vision tower + projector FLOPs of one image."""
        p = self.patches
        vision = self.vision_factor * self.vision_params * p + self.vision_attention_factor * self.vision_attention * p * p
        return vision + self.projector_factor * self.projector_params * self.tokens_per_image

    def llm_per_token(self, span: int) -> int:
        """One LLM token in a span of ``span`` tokens (matmuls + its share of the span's attention)."""
        return self.llm_factor * self.llm_params + self.attention_factor * self.llm_attention * span


def flops_counts(model) -> FlopsCounts:
    """Read a VisionLanguageModel (meta device, FSDP-sharded or compiled alike: DTensor numel is global)."""
    vision_trains = any(p.requires_grad for p in model.vision.parameters())
    proj_trains = any(p.requires_grad for p in model.projector.parameters())
    llm_trains = any(p.requires_grad for p in model.llm.parameters())
    cfg = model.llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = model.llm.base_model
    llm_modules = [*model.llm_layers(), model.llm.get_output_embeddings()]
    if getattr(base, "norm", None) is not None:
        llm_modules.append(base.norm)
    llm_factor = _matmul_factor(llm_trains, vision_trains or proj_trains)

    tower = inner(model.vision)
    used = layers_used(model.vision, model.feature_layer)
    vision_modules = [*list(model.vision_layers())[:used], patch_embedding(model.vision)]
    if is_clip(model.vision):
        vision_modules.append(tower.pre_layrnorm)
    vision_factor = _matmul_factor(vision_trains, False)
    return FlopsCounts(
        llm_params=_numel(llm_modules),
        llm_factor=llm_factor,
        llm_attention=cfg.num_hidden_layers * cfg.num_attention_heads * head_dim,
        attention_factor=4 if llm_factor == 2 else 12,
        vision_params=_numel(vision_modules),
        vision_factor=vision_factor,
        vision_attention=used * model.vision.config.hidden_size,
        vision_attention_factor=12 if vision_trains else 4,
        patches=model.patch_grid**2 + (1 if has_cls_token(model.vision) else 0),
        projector_params=_numel([model.projector]),
        projector_factor=_matmul_factor(proj_trains, vision_trains),
        tokens_per_image=model.tokens_per_image,
        attention_mode=str(model.attention),
    )


def _branch_squares(counts: torch.Tensor) -> torch.Tensor:
    """counts [..., 3] tokens of prompt, chosen, rejected -> (P+C)^2 + (P+R)^2 - P^2 (P^2 without branches)."""
    p, c, r = counts.unbind(-1)
    return (p + c) ** 2 + (p + r) ** 2 - p**2


def span_squares(seq_ids: torch.Tensor, mode: str, branch_ids: torch.Tensor | None = None) -> int:
    """Sum of squared attention-span lengths of a batch [B, L] (see the module docstring)."""
    seq = seq_ids.detach().long().cpu()
    real = seq >= 0
    rows, _ = seq.shape
    branch = branch_ids.detach().long().cpu().clamp(0, 2) if branch_ids is not None else torch.zeros_like(seq)
    if mode == "document":
        n_docs = int(seq.max()) + 1 if bool(real.any()) else 0
        key = torch.arange(rows)[:, None] * n_docs + seq.clamp(min=0)
        slots = rows * max(n_docs, 1)
    else:
        key = torch.arange(rows)[:, None].expand_as(seq)
        slots = rows
    counts = torch.zeros(slots * 3, dtype=torch.long)
    counts.scatter_add_(0, (key * 3 + branch)[real], torch.ones(int(real.sum()), dtype=torch.long))
    return int(_branch_squares(counts.view(slots, 3)).sum())


def batch_flops(counts: FlopsCounts, batch: dict) -> dict[str, int]:
    """Model FLOPs of one micro-batch (the trainer's dict: input_ids, seq_ids, pixel_values, branch_ids)."""
    ids = batch["input_ids"]
    seq = batch.get("seq_ids")
    if seq is None:
        seq = torch.zeros_like(ids)
    tokens = int((seq >= 0).sum())
    squares = span_squares(seq, counts.attention_mode, batch.get("branch_ids"))
    pixels = batch.get("pixel_values")
    images = int(pixels.shape[0]) if pixels is not None else 0
    out = {
        "llm": counts.llm_factor * counts.llm_params * tokens,
        "attention": counts.attention_factor * counts.llm_attention * squares,
        "vision": images * counts.per_image,
    }
    out["total"] = sum(out.values())
    return out


def training_flops(model, context: int) -> dict:
    """Per-token and per-image training FLOPs at a span of ``context`` tokens (what model-info prints)."""
    c = flops_counts(model)
    llm_token = c.llm_per_token(context)
    return {
        "llm_params": c.llm_params,
        "llm_matmul_per_token": c.llm_factor * c.llm_params,
        "attention_per_token": c.attention_factor * c.llm_attention * context,
        "llm_per_token": llm_token,
        "per_image": c.per_image,
        "per_visual_token": llm_token + c.per_image / c.tokens_per_image,
        "context": context,
        "formula": FORMULA,
    }
