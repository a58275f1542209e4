"""Parameter counts per component and training FLOPs (the usual 2/4/6 x params rule + attention).

Matmul FLOPs per token and layer pass: forward 2*N, backward 4*N when the weights train, 2*N
(activation gradients only) when they are frozen but something before them trains, 0 when nothing
before them trains. Attention scores and weighted sum add 4 * layers * d_attn * context per token
forward (PaLM's 12 * layers * d_attn * context for a full training step), context = the sequence.
Embedding lookups are free; a tied lm_head counts as a matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlmforge.model.tower import inner, layers_used

FORMULA = (
    "per token: matmul 2N forward + 4N backward (2N if frozen with a trainable input, 0 if nothing before it "
    "trains) + attention 4 * layers * d_attn * context forward (x3 with backward); N = matmul params used"
)


@dataclass
class ComponentCount:
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def count_parameters(module) -> ComponentCount:
    seen, tr, fr = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            tr += p.numel()
        else:
            fr += p.numel()
    return ComponentCount(tr, fr)


def _linear_params(modules) -> int:
    n = 0
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                n += m.weight.numel()
    return n


def _factor(trains: bool, upstream_trains: bool) -> int:
    return 6 if trains else (4 if upstream_trains else 2)


def training_flops(model, context: int) -> dict:
    """FLOPs of one training step: per LLM token, per image (tower + projector), and per visual token."""
    vision_trains = any(p.requires_grad for p in model.vision.parameters())
    proj_trains = any(p.requires_grad for p in model.projector.parameters())
    llm_trains = any(p.requires_grad for p in model.llm.parameters())
    cfg = model.llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    n_llm = _linear_params([model.llm_layers(), model.llm.get_output_embeddings()])
    f_llm = _factor(llm_trains, vision_trains or proj_trains)
    llm_token = f_llm * n_llm + (f_llm // 2) * 4 * cfg.num_hidden_layers * d_attn * context

    vcfg = model.vision.config
    used = layers_used(model.vision, model.feature_layer)
    patches = model.patch_grid**2 + (1 if vcfg.model_type == "clip_vision_model" else 0)
    n_vis = _linear_params(list(model.vision_layers()[:used]))
    n_patch_embed = _linear_params([inner(model.vision).embeddings])  # the patchify conv
    f_vis = _factor(vision_trains, False)
    vision_image = patches * (f_vis * (n_vis + n_patch_embed) + (f_vis // 2) * 4 * used * vcfg.hidden_size * patches)
    f_proj = _factor(proj_trains, vision_trains)
    n_proj = _linear_params([model.projector])
    proj_image = f_proj * n_proj * model.tokens_per_image
    per_image = vision_image + proj_image
    return {
        "llm_per_token": llm_token,
        "per_image": per_image,
        "per_visual_token": llm_token + per_image / model.tokens_per_image,
        "context": context,
        "formula": FORMULA,
    }
