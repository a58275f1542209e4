"""Architecture configs: shipped presets (JSON under vlmforge/assets/configs), config.json paths, or pretrained folders.

A preset names an architecture only (no weights): the tiny ones build in milliseconds for tests and the
demo, the real ones let `vlmforge model-info` size a model on the meta device.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, CLIPVisionConfig, InternVLVisionConfig, SiglipVisionConfig

from vlmforge.config.model import LLMConfig, VisionConfig
from vlmforge.errors import ConfigError

CONFIG_DIR = Path(str(resources.files("vlmforge") / "assets" / "configs"))
VISION_MODEL_TYPES = ("siglip_vision_model", "clip_vision_model", "internvl_vision")
VISION_CONFIG_CLASSES = {"siglip_vision_model": SiglipVisionConfig, "clip_vision_model": CLIPVisionConfig,
                         "internvl_vision": InternVLVisionConfig}


def shipped_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read architecture config {path}: {e}") from e


def preset_dict(preset: str) -> dict[str, Any]:
    """The config dict of a shipped preset name, a config.json file, or a folder holding one."""
    shipped = CONFIG_DIR / f"{preset}.json"
    if shipped.is_file():
        return _read_json(shipped)
    p = Path(preset)
    if p.is_dir() and (p / "config.json").is_file():
        return _read_json(p / "config.json")
    if p.is_file():
        return _read_json(p)
    raise ConfigError(
        f"architecture preset {preset!r} is neither a shipped preset ({', '.join(shipped_presets())}) "
        "nor a config.json path"
    )


def _vision_part(d: dict[str, Any]) -> dict[str, Any]:
    # A full SigLIP/CLIP checkpoint (model_type siglip/clip) nests the tower config.
    if d.get("model_type") in ("siglip", "clip") and "vision_config" in d:
        sub = dict(d["vision_config"])
        sub["model_type"] = d["model_type"] + "_vision_model"
        return sub
    return _square_sides(d)


def _square_sides(d: dict[str, Any]) -> dict[str, Any]:
    """InternViT configs write image_size / patch_size as [height, width]; the geometry reads one side."""
    if d.get("model_type") != "internvl_vision":
        return d
    d = dict(d)
    for key in ("image_size", "patch_size"):
        value = d.get(key)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ConfigError(f"vision tower {key} {list(value)} is not square; vlmforge runs square images")
            d[key] = int(value[0])
    return d


def vision_config_dict(vision_cfg: VisionConfig) -> dict[str, Any]:
    """Architecture dict of the vision tower (from `pretrained` when set and local, else from `preset`)."""
    if vision_cfg.pretrained:
        p = Path(vision_cfg.pretrained)
        if (p / "config.json").is_file():
            return _vision_part(_read_json(p / "config.json"))
        return _vision_part(AutoConfig.from_pretrained(vision_cfg.pretrained).to_dict())
    d = _vision_part(preset_dict(vision_cfg.preset))
    if d.get("model_type") not in VISION_MODEL_TYPES:
        raise ConfigError(
            f"model.vision.preset {vision_cfg.preset!r}: model_type {d.get('model_type')!r} is not a "
            f"supported vision tower ({', '.join(VISION_MODEL_TYPES)})"
        )
    return d


def vision_config(vision_cfg: VisionConfig):
    """transformers config object of the vision tower (SiglipVisionConfig, CLIPVisionConfig or InternVLVisionConfig)."""
    d = dict(vision_config_dict(vision_cfg))
    kind = d.get("model_type", "siglip_vision_model")
    cls = VISION_CONFIG_CLASSES.get(kind)
    if cls is None:
        raise ConfigError(f"vision tower model_type {kind!r} is not supported ({', '.join(VISION_MODEL_TYPES)})")
    d.pop("transformers_version", None)
    return cls.from_dict(d)


def llm_config(llm_cfg: LLMConfig, trust_remote_code: bool = False):
    """transformers config object of the causal LM."""
    if llm_cfg.pretrained:
        return AutoConfig.from_pretrained(llm_cfg.pretrained, trust_remote_code=trust_remote_code)
    d = dict(preset_dict(llm_cfg.preset))
    kind = d.get("model_type")
    if kind not in CONFIG_MAPPING:
        raise ConfigError(f"model.llm.preset {llm_cfg.preset!r}: unknown model_type {kind!r}")
    d.pop("transformers_version", None)
    return CONFIG_MAPPING[kind].from_dict(d)
