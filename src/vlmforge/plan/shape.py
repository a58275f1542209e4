"""What the planner needs to know about a recipe's model, read from the model built on the meta device
(no memory, no weights; the same build as ``vlmforge model-info``)."""

from __future__ import annotations

from dataclasses import dataclass

from vlmforge.config.recipe import Recipe
from vlmforge.model.build import build_meta_vlm
from vlmforge.model.flops import count_parameters, training_flops
from vlmforge.model.tower import has_cls_token, layers_used
from vlmforge.train.optim import muon_params


@dataclass(frozen=True)
class ModelShape:
    params_total: int
    params_trainable: int
    # FSDP2 shards each vision block and decoder layer as a unit, then the root (everything else:
    # embeddings, head, final norm, projector, the tower's embeddings): the root stays gathered
    # from the start of forward to the end of backward, a layer only while it computes.
    params_root: int
    params_root_trainable: int
    params_largest_unit: int
    params_muon: int  # trainable weight matrices Muon updates (train.optimizer=muon); AdamW takes the rest
    # LLM
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    # vision tower (blocks up to the feature layer) and projector
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    patches: int  # per image, as the tower sees them
    vision_trains: bool
    projector_trains: bool
    tokens_per_image: int
    # model FLOPs per LLM token = llm_matmul_flops + llm_attention_flops * span; per image: image_flops
    llm_matmul_flops: float
    llm_attention_flops: float
    image_flops: float

    def llm_token_flops(self, span: float) -> float:
        return self.llm_matmul_flops + self.llm_attention_flops * span


def _unit_params(unit) -> tuple[int, int]:
    total = trainable = 0
    for p in unit.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def model_shape(cfg: Recipe) -> ModelShape:
    model = build_meta_vlm(cfg.model)

    counts = count_parameters(model)
    units = [*model.vision_layers(), *model.llm_layers()]
    in_units = {id(p) for u in units for p in u.parameters()}
    root = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_units]
    lc = model.llm.config
    vc = model.vision.config
    used = layers_used(model.vision, model.feature_layer)
    vision_trains = any(p.requires_grad for layer in list(model.vision_layers())[:used] for p in layer.parameters())
    at_zero, at_one = training_flops(model, 0), training_flops(model, 1)
    return ModelShape(
        params_total=counts.total,
        params_trainable=counts.trainable,
        params_root=sum(p.numel() for p in root),
        params_root_trainable=sum(p.numel() for p in root if p.requires_grad),
        params_largest_unit=max(_unit_params(u)[0] for u in units),
        params_muon=sum(p.numel() for _, p in muon_params(model)),
        layers=int(lc.num_hidden_layers),
        hidden=int(lc.hidden_size),
        heads=int(lc.num_attention_heads),
        kv_heads=int(getattr(lc, "num_key_value_heads", None) or lc.num_attention_heads),
        head_dim=int(getattr(lc, "head_dim", None) or lc.hidden_size // lc.num_attention_heads),
        intermediate=int(lc.intermediate_size),
        vocab=int(model.llm.get_output_embeddings().weight.shape[0]),
        vision_layers=used,
        vision_hidden=int(vc.hidden_size),
        vision_heads=int(vc.num_attention_heads),
        vision_intermediate=int(vc.intermediate_size),
        patches=model.patch_grid**2 + (1 if has_cls_token(model.vision) else 0),
        vision_trains=vision_trains,
        projector_trains=any(p.requires_grad for p in model.projector.parameters()),
        tokens_per_image=int(model.tokens_per_image),
        llm_matmul_flops=float(at_zero["llm_per_token"]),
        llm_attention_flops=float(at_one["llm_per_token"] - at_zero["llm_per_token"]),
        image_flops=float(at_zero["per_image"]),
    )
