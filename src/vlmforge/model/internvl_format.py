"""The InternVL checkpoint format in and out: transformers' InternVLForConditionalGeneration folders
(OpenGVLab/InternVL3-*-hf) <-> vlmforge checkpoints.

Mapping (exact, both ways): InternViT (InternVLVisionModel) <-> ``vision``; the ``pixel_shuffle_mlp``
projector (pixel shuffle 0.5, ps_version v2, then LayerNorm -> Linear -> GELU -> Linear) <->
``multi_modal_projector`` (``layer_norm`` is our ``norm``, ``linear_1`` / ``linear_2`` as they are);
the causal LM <-> ``language_model`` + ``lm_head``. ``vision_feature_layer`` is our
``model.vision.feature_layer`` as is (-1: the tower's last_hidden_state), the CLS token is dropped
(strategy "default"), ``image_seq_length`` is our visual tokens per tile.

Image layout. InternVL writes an image as ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles)
+ ``</img>``. vlmforge marks an image with ``<image>``; the model's layout (``model.images``, see
:class:`vlmforge.arch.tiles.ImageLayout`) expands it to the tiles' placeholders wrapped in
``model.images.start`` / ``end``. An import sets ``start`` / ``end`` to the tokenizer's
``start_image_token`` / ``end_image_token`` (``<img>`` / ``</img>``), so the model reads InternVL's
own token sequence with ``<image>`` in the place of ``<IMG_CONTEXT>`` (image features replace those
positions, so their embedding is never read). An export makes ``<image>`` the processor's context
token and ``start`` / ``end`` its start / end tokens, so transformers' processor writes the very ids
vlmforge writes. Checkpoints imported before ``model.images`` carried the wrap in a chat-template
prelude (:func:`image_layout_prelude`); they load and export as before.

Tiles. A tiled image is its tiles in a row (row-major, thumbnail last), each one pass of the tower,
their features one run of context tokens: the model takes them as consecutive "images". The tiling
is InternVL's processor's: InternVLProcessor passes ``crop_to_patches=True`` to its GotOcr2 image
processor on every call, which then tiles an image into ``min_patches``..``max_patches`` tiles plus a
thumbnail whenever ``max_patches`` > 1. An import turns those settings into ``model.images``
(tiles, min_tiles, max_tiles, thumbnail); an export writes ``model.images`` (or an explicit
:class:`vlmforge.arch.tiles.Tiling`) back as the image processor's settings.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoTokenizer,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
)
from transformers.initialization import no_init_weights

from vlmforge.arch.geometry import wrap_ids
from vlmforge.arch.tiles import Tiling
from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.config.loader import set_value
from vlmforge.errors import ConfigError, UserError
from vlmforge.model.decoding import end_of_turn_ids
from vlmforge.model.export import ExportRefused, generation_config, load_converted
from vlmforge.model.llava_import import build_imported, load_source_tokenizer
from vlmforge.model.llava_layouts import ImportPlan, take
from vlmforge.model.saving import save_vlm
from vlmforge.model.state_files import read_state_dict
from vlmforge.model.tower import INTERNVIT, is_internvit
from vlmforge.text.chat import CONTENT_PARTS_PRELUDE, client_chat_template

LAYOUT = "internvl-hf"
IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
PROCESSOR_CONFIG = "processor_config.json"
LEGACY_IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
# The tokenizer attributes InternVLProcessor reads (the tokenizer's model-specific special tokens).
TOKEN_NAMES = ("start_image_token", "end_image_token", "context_image_token", "video_token")
_LAYOUT_MARK = re.compile(r"\{#- vlmforge image layout: (\[.*?\]) #\}")


# ---------------------------------------------------------------- the <img> ... </img> layout


def image_layout_prelude(start: str, end: str) -> str:
    """Jinja put before a chat template: each ``<image>`` of string content becomes
    ``start + <image> + end``. The mark in its first line names the two tokens."""
    wrapped = start + IMAGE_TOKEN + end
    return (
        "{#- vlmforge image layout: " + json.dumps([start, end]) + " #}"
        "{%- set vlmforge_layout = namespace(messages=[]) %}"
        "{%- for message in messages %}"
        "{%- if message['content'] is string %}"
        "{%- set vlmforge_layout.messages = vlmforge_layout.messages + [{'role': message['role'], "
        "'content': message['content'] | replace(" + json.dumps(IMAGE_TOKEN) + ", " + json.dumps(wrapped) + ")}] %}"
        "{%- else %}"
        "{%- set vlmforge_layout.messages = vlmforge_layout.messages + [message] %}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- set messages = vlmforge_layout.messages %}"
    )


def split_layout(template: str | None) -> tuple[str, str, str | None]:
    """(start, end, the template without vlmforge's preludes): start = end = "" when the template
    does not wrap images."""
    if template is None:
        return "", "", None
    if template.startswith(CONTENT_PARTS_PRELUDE):
        template = template[len(CONTENT_PARTS_PRELUDE):]
    m = _LAYOUT_MARK.match(template)
    if m is None:
        return "", "", template
    start, end = json.loads(m.group(1))
    prelude = image_layout_prelude(start, end)
    if not template.startswith(prelude):
        raise UserError("the chat template's vlmforge image-layout prelude was edited; restore it or remove it whole")
    return start, end, template[len(prelude):]


def with_image_layout(template: str, start: str, end: str) -> str:
    """``template`` rendering content parts and wrapping each image in start / end (the chat template
    of a checkpoint imported before ``model.images`` carried the wrap)."""
    _, _, base = split_layout(template)
    return CONTENT_PARTS_PRELUDE + image_layout_prelude(start, end) + base if (start or end) else client_chat_template(base)


# ---------------------------------------------------------------- import


def is_internvl_folder(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "internvl"


def _refuse(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what}")


def _vision_config(d: dict[str, Any], where: str) -> InternVLVisionConfig:
    d = {k: v for k, v in d.items() if k not in ("transformers_version", "architectures", "_name_or_path")}
    if d.get("model_type", INTERNVIT) != INTERNVIT:
        raise _refuse(where, f"vision_config model_type {d['model_type']!r}; InternVL's tower is InternViT ({INTERNVIT})")
    cfg = InternVLVisionConfig.from_dict(d)
    for key in ("image_size", "patch_size"):
        value = list(getattr(cfg, key))
        if len(set(value)) != 1:
            raise _refuse(where, f"vision_config {key} {value} is not square; vlmforge runs square tiles")
        setattr(cfg, key, int(value[0]))  # saved as one side, read back as a pair
    return cfg


def plan_internvl(src: Path, cfg: dict[str, Any]) -> ImportPlan:
    """The import plan of a transformers InternVL folder; what vlmforge cannot run exactly is refused."""
    where = f"{src}/config.json"
    if cfg.get("auto_map"):
        raise _refuse(where, "its architecture is defined by Python files of the folder (auto_map); vlmforge maps "
                             "transformers' InternVLForConditionalGeneration only (the *-hf checkpoints)")
    if "vision_config" not in cfg or "text_config" not in cfg:
        raise _refuse(where, "an InternVL config needs vision_config and text_config")
    vision = _vision_config(dict(cfg["vision_config"]), where)
    ratio = cfg.get("downsample_ratio", 0.5)
    if ratio != 0.5:
        raise _refuse(where, f"downsample_ratio {ratio}; pixel_shuffle_mlp merges 2 x 2 patches (0.5)")
    layer = cfg.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise _refuse(where, f"vision_feature_layer {layer!r} concatenates several layers; vlmforge feeds one")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise _refuse(where, f"vision_feature_select_strategy {strategy!r} keeps InternViT's CLS token; "
                             "vlmforge drops it (strategy default)")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise _refuse(where, f"projector_hidden_act {act!r}; vlmforge's projector uses exact GELU")
    text = {k: v for k, v in dict(cfg["text_config"]).items() if k not in ("transformers_version", "_name_or_path")}
    lm_type = text.get("model_type", "qwen2")  # InternVLConfig's default text config
    if lm_type not in CONFIG_MAPPING:
        raise _refuse(where, f"language model type {lm_type!r} is not a transformers architecture")
    llm_config = CONFIG_MAPPING[lm_type].from_dict(text)
    grid = vision.image_size // vision.patch_size
    seq = cfg.get("image_seq_length")
    if seq is not None and grid % 2 == 0 and seq != (grid // 2) ** 2:
        raise _refuse(where, f"image_seq_length {seq} is not the {(grid // 2) ** 2} tokens a {grid} x {grid} "
                             "patch grid gives after pixel shuffle")
    sd = read_state_dict(src)
    tower = take(sd, "model.vision_tower.") or take(sd, "vision_tower.")
    proj = take(sd, "model.multi_modal_projector.") or take(sd, "multi_modal_projector.")
    proj = {("norm." + k[len("layer_norm."):] if k.startswith("layer_norm.") else k): v for k, v in proj.items()}
    llm = take(sd, "model.language_model.", "model.") or take(sd, "language_model.model.", "model.")
    llm.update(take(sd, "language_model.lm_head.", "lm_head.") or take(sd, "lm_head.", "lm_head."))
    if sd:
        raise UserError(f"{src}: weights vlmforge cannot place: {', '.join(sorted(sd)[:4])}")
    return ImportPlan(
        layout=LAYOUT, vision_config=vision, llm_config=llm_config, projector_kind="pixel_shuffle_mlp", pool_size=None,
        feature_layer=layer, image_token_id=None, vision=tower, projector=proj, llm=llm,
        sources={"checkpoint": str(src)}, notes=[],
    )


def _token_attr(tok, name: str) -> str | None:
    try:
        value = getattr(tok, name)
    except AttributeError:
        return None
    return None if value is None else str(value)


def _in_vocab(tok, token: str) -> bool:
    return tok.convert_tokens_to_ids(token) not in (None, tok.unk_token_id)


def image_tokens(tok, image_token_id: int, where: str) -> tuple[str, str, str]:
    """(start, end, context) tokens of an InternVL tokenizer: its named tokens, else InternVL's."""
    named = {name: _token_attr(tok, name) for name in TOKEN_NAMES}
    start = IMG_START if named["start_image_token"] is None else named["start_image_token"]
    end = IMG_END if named["end_image_token"] is None else named["end_image_token"]
    context = named["context_image_token"] or IMG_CONTEXT
    for what, token in (("start", start), ("end", end)):
        if token and not _in_vocab(tok, token):
            raise UserError(f"{where}: the tokenizer has no {token!r} ({what} of each image's tokens in InternVL)")
    found = tok.convert_ids_to_tokens(image_token_id) if 0 <= image_token_id < len(tok) else None
    if found != context:
        raise UserError(f"{where}: image_token_id {image_token_id} is {found!r} in the tokenizer, not its context "
                        f"token {context!r}; the tokenizer does not belong to this checkpoint")
    return start, end, context


def source_image_processor(src: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """(file, settings) of the source's image processor: processor_config.json's nested
    image_processor, or the legacy preprocessor_config.json; (None, None) when it has neither."""
    for name in (PROCESSOR_CONFIG, LEGACY_IMAGE_PROCESSOR_CONFIG):
        p = src / name
        if not p.is_file():
            continue
        try:
            d = json.loads(p.read_text())
        except ValueError as e:
            raise UserError(f"{p}: not valid JSON ({e})") from None
        d = d.get("image_processor", d) if name == PROCESSOR_CONFIG else d
        if "image_mean" in d or "size" in d:
            return p, d
    return None, None


def _patches(path: Path, proc: dict[str, Any], key: str) -> int:
    value = proc.get(key, getattr(GotOcr2ImageProcessorPil, key))  # absent: the image processor's default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: {key} {value!r} must be an integer >= 1")
    return value


def source_tiling(path: Path | None, proc: dict[str, Any] | None) -> dict[str, Any]:
    """``model.images`` tiling keys for the source's processor. AutoProcessor builds
    InternVLProcessor for an InternVL folder, and it passes crop_to_patches=True on every call
    (whatever the image processor's own crop_to_patches), so images are tiled exactly when
    max_patches > 1, each into min_patches..max_patches tiles plus a thumbnail (GotOcr2 always adds
    one to a grid of more than one tile). No image processor config: one tile per image."""
    if proc is None:
        return {"tiles": False}
    lo, hi = _patches(path, proc, "min_patches"), _patches(path, proc, "max_patches")
    if lo > hi:
        raise UserError(f"{path}: min_patches {lo} is above max_patches {hi}")
    crops = bool(getattr(InternVLProcessor, "images_kwargs", {}).get("crop_to_patches", True))
    # share_budget off: the processor gives every image of a prompt the whole budget (fine-tuning
    # with InternVL's shared multi-image budget is a recipe's --set model.images.share_budget=true)
    return {"tiles": crops and hi > 1, "min_tiles": lo, "max_tiles": hi, "thumbnail": True, "share_budget": False}


def preprocessing_notes(model, proc: dict[str, Any] | None) -> list[str]:
    """Where the source's image processor and vlmforge's preprocessing of the imported model differ,
    and how the imported model tiles."""
    if proc is None:
        return ["the source has no image processor config; vlmforge preprocesses as for any InternViT tower, one "
                "tile per image (model.images.tiles false)"]
    spec, notes = model.preprocess_spec(), []
    size = proc.get("size") or {}
    side = size.get("height") if isinstance(size, dict) else size
    if side is not None and int(side) != spec["size"]:
        notes.append(f"the source resizes tiles to {side} px, vlmforge to {spec['size']} px")
    for key, ours in (("image_mean", spec["mean"]), ("image_std", spec["std"])):
        theirs = proc.get(key)
        if theirs is not None and any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(theirs, ours)):
            notes.append(f"the source normalises with {key} {list(theirs)}, vlmforge with {list(ours)}")
    images = model.images
    if images.tiles:
        notes.append(f"images are tiled as InternVLProcessor tiles them: {images.min_tiles}-{images.max_tiles} tiles "
                     f"of {spec['size']} px and a thumbnail (model.images); with several images in one prompt "
                     + ("each gets the whole budget, as in transformers' processor (model.images.share_budget "
                        "false; InternVL's training data shares it)" if not images.share_budget else
                        f"vlmforge shares the {images.max_tiles} among them (InternVL's training rule), where "
                        "transformers' processor gives each image the whole budget"))
        if proc.get("crop_to_patches") is False:
            notes.append("the source's image processor alone has crop_to_patches false; InternVLProcessor, which "
                         "AutoProcessor builds for the folder, turns it on for every call, so vlmforge tiles")
    else:
        notes.append("the source's processor feeds each image as one tile (max_patches 1); so does vlmforge")
    return notes


def import_internvl(src: Path, out: Path, tokenizer: Path | None = None, trust_remote_code: bool = False,
                    name: str | None = None):
    """Write a vlmforge checkpoint folder at `out` from a transformers InternVL folder; returns
    (model, tokenizer, cfg, plan)."""
    cfg_path = src / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except OSError:
        raise UserError(f"{src}: no config.json (not a transformers checkpoint folder)") from None
    except ValueError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from None
    if not is_internvl_folder(cfg):
        raise UserError(f"{cfg_path}: model_type {cfg.get('model_type')!r} is not internvl "
                        "(a transformers InternVLForConditionalGeneration folder)")
    plan = plan_internvl(src, cfg)
    proc_path, proc = source_image_processor(src)
    tiling = source_tiling(proc_path, proc)
    tok_dir = tokenizer or src
    tok = load_source_tokenizer(tok_dir, trust_remote_code, plan.notes)
    context_id = int(cfg.get("image_token_id", cfg.get("image_token_index", -1)))  # older configs: _index
    start, end, context = image_tokens(tok, context_id, str(tok_dir))
    tok.chat_template = client_chat_template(split_layout(tok.chat_template)[2])
    wrap = f"between {start!r} and {end!r} (model.images.start / end)" if start or end else "with no start / end tokens"
    plan.notes.append(f"images are written {wrap}, {IMAGE_TOKEN} standing for the source's {context} (id {context_id})")
    model, rcfg = build_imported(plan, tok, out, name or f"imported-{src.resolve().name}", trust_remote_code)
    try:
        for key, value in {**tiling, "start": start or None, "end": end or None}.items():
            set_value(rcfg, f"model.images.{key}", value, f"{proc_path or src}")
    except ConfigError as e:
        raise UserError(str(e)) from None
    model.images = rcfg.model.images
    plan.notes.extend(preprocessing_notes(model, proc))
    save_vlm(model, tok, rcfg, out)
    return model, tok, rcfg, plan


# ---------------------------------------------------------------- export


def internvl_refusal(model) -> str | None:
    """None when the model maps onto InternVLForConditionalGeneration, else why not."""
    why = []
    if not is_internvit(model.vision):
        why.append(f"its tower is {model.vision.config.model_type}; InternVLForConditionalGeneration always builds "
                   "InternViT (InternVLVisionModel), so only an InternViT tower (model.vision.preset "
                   "tiny-internvit, internvit-300m-448px, or an imported InternVL) can be exported to it")
    if model.projector.kind != "pixel_shuffle_mlp":
        why.append(f"its projector is {model.projector.kind}; InternVL's is pixel_shuffle_mlp")
    elif model.projector.linear_1.out_features != model.llm.config.hidden_size:
        why.append(f"its projector hidden width {model.projector.linear_1.out_features} differs from the LLM width "
                   f"{model.llm.config.hidden_size}")
    if model.positions == "v2pe" and model.v2pe_delta != 1.0:
        why.append(f"it uses V2PE positions with delta {model.v2pe_delta}; transformers' InternVL uses integer "
                   "positions (delta 1)")
    if why:
        return "cannot export to InternVLForConditionalGeneration: " + "; ".join(why)
    return None


def internvl_config(model, tokenizer, vocab_size: int) -> InternVLConfig:
    text = model.llm.config.to_dict()
    text["eos_token_id"] = end_of_turn_ids(tokenizer)
    text["vocab_size"] = int(vocab_size)
    tied = bool(getattr(model.llm.config, "tie_word_embeddings", False))
    return InternVLConfig(
        vision_config=model.vision.config.to_dict(), text_config=text, image_token_id=int(model.image_token_id),
        image_seq_length=int(model.tokens_per_image), downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=int(model.feature_layer), vision_feature_select_strategy="default",
        tie_word_embeddings=tied, pad_token_id=int(tokenizer.pad_token_id),
    )


def _grown(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.mean(0, keepdim=True).expand(rows - t.shape[0], -1)]) if rows > t.shape[0] else t


def internvl_state_dict(model, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our weights under InternVL's names; the vocabulary grown (mean rows) to `vocab_size`."""
    out = {f"model.vision_tower.{k}": v for k, v in model.vision.state_dict().items()}
    for k, v in model.projector.state_dict().items():
        k = "layer_norm." + k[len("norm."):] if k.startswith("norm.") else k
        out[f"model.multi_modal_projector.{k}"] = v
    out.update({f"model.language_model.{k}": v for k, v in model.llm.base_model.state_dict().items()})
    emb = "model.language_model.embed_tokens.weight"
    out[emb] = _grown(out[emb], vocab_size)
    out["lm_head.weight"] = _grown(model.llm.get_output_embeddings().weight, vocab_size)
    return out


def image_processor(model, tiling: Tiling | None = None) -> GotOcr2ImageProcessorPil:
    """InternVL's image processor with vlmforge's preprocessing: one tile per image (resize to the
    tower's size), or with `tiling` InternVL's dynamic tiles (crop_to_patches, thumbnail last).
    InternVLProcessor turns crop_to_patches on for every call, so one tile is max_patches 1."""
    spec = model.preprocess_spec()
    common = dict(image_mean=spec["mean"], image_std=spec["std"], rescale_factor=spec["rescale"])
    if tiling is None:
        s = spec["size"]
        return GotOcr2ImageProcessorPil(size={"height": s, "width": s}, crop_to_patches=False, min_patches=1,
                                        max_patches=1, **common)
    if not tiling.thumbnail:
        raise ExportRefused("cannot export tiling without a thumbnail: InternVL's image processor always adds one")
    if tiling.tile != spec["size"]:
        raise ExportRefused(f"cannot export {tiling.tile} px tiles for a tower that runs at {spec['size']} px: "
                            "InternVL's image processor cuts tiles of the tower's size")
    return GotOcr2ImageProcessorPil(size={"height": tiling.tile, "width": tiling.tile}, crop_to_patches=True,
                                    min_patches=tiling.min_tiles, max_patches=tiling.max_tiles, **common)


def export_wrap(model, tokenizer) -> tuple[str, str, str | None]:
    """(start, end, chat template without vlmforge's preludes): the text around each image's
    placeholders the model reads, ``model.images.start`` / ``end`` (or, for a checkpoint imported
    before those keys, the chat template's layout prelude). InternVLProcessor writes each as one
    token of the tokenizer, so anything else is refused."""
    t_start, t_end, base = split_layout(tokenizer.chat_template)
    c_start, c_end = model.images.start or "", model.images.end or ""
    if (t_start or t_end) and (c_start or c_end):
        raise ExportRefused(f"cannot export images wrapped twice: the chat template writes {t_start}<image>{t_end} "
                            f"and model.images.start / end wrap that in {c_start!r} / {c_end!r}; InternVLProcessor "
                            "writes one wrap")
    start, end = (c_start, c_end) if (c_start or c_end) else (t_start, t_end)
    for key, text in (("start", start), ("end", end)):
        if text and wrap_ids(tokenizer, text) != (tokenizer.convert_tokens_to_ids(text),):
            raise ExportRefused(f"cannot export model.images.{key} {text!r}: it is not one token of the tokenizer, and "
                                f"InternVLProcessor writes its {key}_image_token as one token")
    return start, end, base


def video_processor(model) -> dict[str, Any]:
    """InternVLVideoProcessor's settings, nested in processor_config.json as InternVLProcessor saves
    them (AutoProcessor needs a video processor config; building the processor itself needs
    torchvision): frames preprocessed as one tile each, with vlmforge's statistics. vlmforge has no
    video path, so this only lets the processor load."""
    spec = model.preprocess_spec()
    s = spec["size"]
    return {"video_processor_type": "InternVLVideoProcessor", "size": {"height": s, "width": s}, "resample": 3,
            "image_mean": spec["mean"], "image_std": spec["std"], "rescale_factor": spec["rescale"],
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True}


def _export_tokenizer(tokenizer, out: Path, tokens: dict[str, str], template: str, trust_remote_code: bool):
    """Save the tokenizer with InternVL's named image tokens (the attributes InternVLProcessor reads);
    a named token the tokenizer lacks (a vlmforge tokenizer's <video>) is added."""
    extra = list(tokenizer.extra_special_tokens)
    tokenizer.save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out), extra_special_tokens=tokens, trust_remote_code=trust_remote_code,
                                        local_files_only=True)
    tok.extra_special_tokens = extra  # naming tokens replaces this list; keep the tokenizer's own
    tok.chat_template = template
    tok.save_pretrained(str(out))
    return tok


def export_internvl(model, tokenizer, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                    tiling: Tiling | None = None, trust_remote_code: bool = False) -> Path:
    """Write a folder that AutoModelForImageTextToText / AutoProcessor load offline as
    InternVLForConditionalGeneration + InternVLProcessor (see the module docstring). The processor
    tiles as ``model.images`` says, unless `tiling` is given."""
    refusal = internvl_refusal(model)
    if refusal is not None:
        raise ExportRefused(refusal)
    start, end, base = export_wrap(model, tokenizer)
    if tiling is None:
        tiling = model.image_layout(tokenizer).tiling
    image_proc = image_processor(model, tiling)  # before anything is written: it may refuse
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The processor writes each image as start + context x (tokens x tiles) + end; the context token
    # is our <image>, the start / end tokens those the model was trained with (none: empty).
    # InternVLProcessor also needs a video token distinct from the image's: the tokenizer's, else
    # <video> added (one mean-initialised embedding row, never generated: vlmforge has no video).
    video = _token_attr(tokenizer, "video_token")
    tokens = {"start_image_token": start, "end_image_token": end, "context_image_token": IMAGE_TOKEN,
              "video_token": video if video and video != IMAGE_TOKEN and _in_vocab(tokenizer, video) else VIDEO}
    exported_tok = _export_tokenizer(tokenizer, out, tokens, client_chat_template(base), trust_remote_code)
    added = list(range(len(tokenizer), len(exported_tok)))
    vocab = max(model.llm.get_input_embeddings().num_embeddings, len(exported_tok))
    config = internvl_config(model, tokenizer, vocab)
    config.architectures = ["InternVLForConditionalGeneration"]
    with no_init_weights():
        hf = InternVLForConditionalGeneration(config)
    state = internvl_state_dict(model, vocab)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    load_converted(hf, state, bool(config.tie_word_embeddings), "InternVL", dtype)
    gen = generation_config(model, tokenizer)
    gen.suppress_tokens = list(gen.suppress_tokens) + added
    hf.generation_config = gen
    hf.save_pretrained(str(out))
    processor = {"image_processor": json.loads(image_proc.to_json_string()), "video_processor": video_processor(model),
                 "image_seq_length": int(model.tokens_per_image), "processor_class": "InternVLProcessor"}
    (out / PROCESSOR_CONFIG).write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    return out
