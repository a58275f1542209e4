"""Read the published LLaVA-family layouts into one plan: tower, projector and LM configs and weights.

Two layouts:

- ``llava-hf``: transformers' LlavaForConditionalGeneration folder (config.json with vision_config,
  text_config, image_token_index, vision_feature_layer, vision_feature_select_strategy; weights
  ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*`` / ``language_model.lm_head``
  as transformers writes them, or ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
  ``model.language_model.*``, ``lm_head.weight``).
- ``llava-repo``: the original LLaVA repository and its forks (LLaVA-Unified, the MLM-Filter judges):
  a causal-LM config with ``mm_vision_tower``, ``mm_projector_type`` (``mlp2x_gelu``: weights
  ``model.mm_projector.0/.2``; ``aapool_mlp``: AdaptiveAvgPool2d to sqrt(mm_num_image_tokens)^2, then
  ``model.mm_projector.mlp_projector.0/.2``), ``mm_vision_select_layer`` (hidden_states index, as
  ours) and ``mm_vision_select_feature`` (``patch``: CLIP's CLS dropped, SigLIP's patches all kept).
  The tower is loaded from the ``mm_vision_tower`` folder, as LLaVA does (the checkpoint's own copy
  only with ``unfreeze_mm_vision_tower``).

What vlmforge cannot run exactly is refused with the reason (UserError).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import CONFIG_MAPPING, CLIPVisionConfig, SiglipVisionConfig

from vlmforge.errors import UserError
from vlmforge.model.state_files import read_state_dict

# LLaVA-repo model_type -> the transformers LM it wraps (LlavaLlamaForCausalLM, LlavaQwenForCausalLM, ...).
REPO_LM_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_qwen": "qwen2", "llava_qwen2": "qwen2",
                 "llava_qwen3": "qwen3", "llava_mistral": "mistral", "llava_mixtral": "mixtral", "llava_gemma": "gemma"}
REPO_PROJECTORS = {"mlp2x_gelu": ("mlp", "model.mm_projector."), "aapool_mlp": ("avgpool_mlp", "model.mm_projector.mlp_projector.")}
# LLaVA training/runtime keys on the LM config: not part of the LM's architecture.
REPO_ONLY_KEYS = ("image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length",
                  "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "use_mm_proj", "s2",
                  "s2_scales", "architectures", "model_type", "transformers_version", "_name_or_path", "auto_map")
TOWER_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


@dataclass
class ImportPlan:
    layout: str
    vision_config: Any  # SiglipVisionConfig | CLIPVisionConfig
    llm_config: Any  # the transformers config of the causal LM
    projector_kind: str
    pool_size: int | None
    feature_layer: int
    image_token_id: int | None  # llava-hf: the id the source marks images with; None: '<image>' of the tokenizer
    vision: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor]  # linear_1.* / linear_2.*
    llm: dict[str, torch.Tensor]  # the causal LM's own names: model.*, lm_head.weight
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise UserError(f"{folder}: no config.json (not a transformers / LLaVA checkpoint folder)") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def detect_layout(src: Path, cfg: dict[str, Any]) -> str:
    if (src / "adapter_config.json").is_file():
        raise UserError(f"{src} is a LoRA adapter; merge it into its base model first (LLaVA: scripts/merge_lora_weights.py)")
    if cfg.get("auto_map"):
        raise UserError(
            f"{src}/config.json: its architecture is defined by Python files of the folder (auto_map "
            f"{sorted(cfg['auto_map'])}); importing would run that code, and vlmforge maps transformers' own "
            "architectures only"
        )
    if cfg.get("model_type") == "llava" and "text_config" in cfg and "vision_config" in cfg:
        return "llava-hf"
    if cfg.get("mm_vision_tower") or (cfg.get("vision_tower") and cfg.get("mm_projector_type")):
        return "llava-repo"
    raise UserError(
        f"{src}/config.json (model_type {cfg.get('model_type')!r}) is neither a transformers LLaVA folder "
        "(model_type llava with vision_config and text_config) nor a LLaVA-repository checkpoint (mm_vision_tower)"
    )


def _vision_cfg(d: dict[str, Any], where: str):
    d = dict(d)
    if d.get("model_type") in ("siglip", "clip") and "vision_config" in d:  # a full dual-tower checkpoint
        d = dict(d["vision_config"], model_type=d["model_type"] + "_vision_model")
    cls = {"siglip_vision_model": SiglipVisionConfig, "clip_vision_model": CLIPVisionConfig}.get(d.get("model_type"))
    if cls is None:
        raise UserError(f"{where}: vision tower model_type {d.get('model_type')!r} is not a SigLIP or CLIP tower")
    d.pop("transformers_version", None)
    cfg = cls.from_dict(d)
    if cls is SiglipVisionConfig:
        cfg.vision_use_head = False  # the pooling head is never run
    return cfg


def _lm_cfg(d: dict[str, Any], model_type: str, where: str):
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"{where}: language model type {model_type!r} is not a transformers architecture")
    d = {k: v for k, v in d.items() if k not in REPO_ONLY_KEYS and not k.startswith("mm_")}
    return CONFIG_MAPPING[model_type].from_dict(d)


def take(sd: dict[str, torch.Tensor], prefix: str, new_prefix: str = "") -> dict[str, torch.Tensor]:
    """Pop the keys under `prefix` out of `sd`, renamed to `new_prefix` + rest."""
    keys = [k for k in sd if k.startswith(prefix)]
    return {new_prefix + k[len(prefix):]: sd.pop(k) for k in keys}


def tower_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tower's tensors under our names: `vision_model.` stripped, the text tower, SigLIP's pooling head
    and the contrastive-head scalars left out."""
    out = {}
    for k, v in sd.items():
        k = k[len("vision_model."):] if k.startswith("vision_model.") else k
        if k.startswith(TOWER_PARTS):
            out[k] = v
    return out


def _check_strategy(tower_type: str, keeps_first: bool, what: str) -> None:
    clip = tower_type == "clip_vision_model"
    if clip and keeps_first:
        raise UserError(f"{what} keeps CLIP's CLS token; vlmforge feeds the projector patch tokens only (CLS dropped)")
    if not clip and not keeps_first:
        raise UserError(f"{what} drops the first SigLIP patch (SigLIP has no CLS token); vlmforge keeps every patch")


def plan_llava_hf(src: Path, cfg: dict[str, Any]) -> ImportPlan:
    where = f"{src}/config.json"
    vision = _vision_cfg(cfg["vision_config"], where)
    text = dict(cfg["text_config"])
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise UserError(f"{where}: vision_feature_layer {layer!r} concatenates several layers; vlmforge feeds one")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise UserError(f"{where}: vision_feature_select_strategy {strategy!r} is not default or full")
    _check_strategy(vision.model_type, strategy == "full", f"{where}: vision_feature_select_strategy {strategy!r}")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise UserError(f"{where}: projector_hidden_act {act!r}; vlmforge's projector uses exact GELU")
    sd = read_state_dict(src)
    tower = tower_weights(take(sd, "model.vision_tower.") or take(sd, "vision_tower."))
    proj = take(sd, "model.multi_modal_projector.") or take(sd, "multi_modal_projector.")
    llm = take(sd, "model.language_model.", "model.") or take(sd, "language_model.model.", "model.")
    llm.update(take(sd, "language_model.lm_head.", "lm_head.") or take(sd, "lm_head.", "lm_head."))
    if sd:
        raise UserError(f"{src}: weights vlmforge cannot place: {', '.join(sorted(sd)[:4])}")
    notes = []
    if not cfg.get("multimodal_projector_bias", True):
        for name in ("linear_1", "linear_2"):  # no bias = a zero bias
            proj[f"{name}.bias"] = torch.zeros(proj[f"{name}.weight"].shape[0])
        notes.append("the projector has no biases; imported with zero biases (the same function)")
    return ImportPlan(
        layout="llava-hf", vision_config=vision, llm_config=_lm_cfg(text, text.get("model_type", ""), where),
        projector_kind="mlp", pool_size=None, feature_layer=layer, image_token_id=int(cfg.get("image_token_index", -1)),
        vision=tower, projector=proj, llm=llm, sources={"checkpoint": str(src)}, notes=notes,
    )


def find_vision_tower(name: str, src: Path, given: Path | None) -> Path:
    """The tower folder: --vision-tower, else mm_vision_tower as a local folder or in the local HF cache."""
    if given is not None:
        if not (given / "config.json").is_file():
            raise UserError(f"--vision-tower {given}: no config.json (a SigLIP or CLIP transformers folder)")
        return given
    for p in (Path(name), src / name):
        if (p / "config.json").is_file():
            return p
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache (or not a hub id): huggingface_hub raises several kinds
        raise UserError(
            f"the vision tower {name!r} (mm_vision_tower) is not a local folder nor in the local Hugging Face cache; "
            f"vlmforge does not download: fetch it (huggingface-cli download {name}) and pass --vision-tower DIR"
        ) from None


def plan_llava_repo(src: Path, cfg: dict[str, Any], vision_tower: Path | None = None) -> ImportPlan:
    where = f"{src}/config.json"
    ptype = cfg.get("mm_projector_type", "linear")
    if ptype not in REPO_PROJECTORS:
        what = "one Linear (LLaVA-1.0)" if ptype == "linear" else "an MLP of another depth" if re.fullmatch(r"mlp\d+x_gelu", ptype) else "not a LLaVA projector vlmforge has"
        raise UserError(f"{where}: mm_projector_type {ptype!r} is {what}; vlmforge imports {', '.join(REPO_PROJECTORS)}")
    for key, ok, why in (
        ("mm_patch_merge_type", ("flat",), "merges anyres tiles with image_newline tokens"),
        ("image_aspect_ratio", ("pad", "square", "resize"), "tiles images at several resolutions"),
        ("mm_vision_select_feature", ("patch",), "feeds CLS or pooled features, vlmforge feeds patch tokens"),
    ):
        if cfg.get(key) is not None and cfg[key] not in ok:
            raise UserError(f"{where}: {key} {cfg[key]!r} {why}; vlmforge runs {' / '.join(ok)}")
    if cfg.get("mm_use_im_start_end"):
        raise UserError(f"{where}: mm_use_im_start_end wraps each image in <im_start>/<im_end> tokens; vlmforge does not")
    if cfg.get("s2"):
        raise UserError(f"{where}: s2 runs the tower at several scales; vlmforge runs it once")
    if "mm_vision_select_layer" not in cfg:
        raise UserError(f"{where}: no mm_vision_select_layer (which tower layer feeds the projector)")
    base = REPO_LM_TYPES.get(cfg.get("model_type"), cfg.get("model_type"))
    tower_name = str(cfg.get("mm_vision_tower") or cfg.get("vision_tower"))
    tower_dir = find_vision_tower(tower_name, src, vision_tower)
    vision = _vision_cfg(read_config(tower_dir), f"{tower_dir}/config.json")
    if cfg.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise UserError(f"{where}: mm_hidden_size {cfg['mm_hidden_size']} differs from the tower's width {vision.hidden_size} ({tower_dir})")
    lm = dict(cfg)
    if cfg.get("model_type") == "llava_qwen":
        lm["rope_scaling"] = None  # LlavaQwenForCausalLM sets it so in its constructor
    kind, prefix = REPO_PROJECTORS[ptype]
    pool = None
    if kind == "avgpool_mlp":
        n = int(cfg.get("mm_num_image_tokens") or 0)
        if n < 1:
            raise UserError(f"{where}: aapool_mlp without mm_num_image_tokens (the pooled tokens per image)")
        pool = int(n ** 0.5)  # AvgPoolProjector's own arithmetic
    sd = read_state_dict(src)
    embedded = tower_weights(take(sd, "model.vision_tower.vision_tower."))
    notes, sources = [], {"checkpoint": str(src), "vision_tower": str(tower_dir)}
    if cfg.get("unfreeze_mm_vision_tower"):
        if not embedded:
            raise UserError(f"{where}: unfreeze_mm_vision_tower is set but the checkpoint holds no model.vision_tower.vision_tower.* weights")
        tower, sources["vision_weights"] = embedded, "checkpoint (unfreeze_mm_vision_tower)"
    else:
        tower, sources["vision_weights"] = tower_weights(read_state_dict(tower_dir)), str(tower_dir)
    proj = take(sd, prefix + "0.", "linear_1.")
    proj.update(take(sd, prefix + "2.", "linear_2."))
    llm = take(sd, "lm_head.", "lm_head.")
    llm.update({k: sd.pop(k) for k in [k for k in list(sd) if k.startswith("model.") and not k.startswith("model.mm_projector.")]})
    if sd:
        raise UserError(f"{src}: weights vlmforge cannot place: {', '.join(sorted(sd)[:4])}")
    if cfg.get("image_aspect_ratio") == "pad":
        notes.append("LLaVA pads images to a square with the mean colour before resizing; vlmforge resizes: "
                     "non-square images are preprocessed differently")
    return ImportPlan(
        layout="llava-repo", vision_config=vision, llm_config=_lm_cfg(lm, base, where), projector_kind=kind,
        pool_size=pool, feature_layer=int(cfg["mm_vision_select_layer"]), image_token_id=None,
        vision=tower, projector=proj, llm=llm, sources=sources, notes=notes,
    )
