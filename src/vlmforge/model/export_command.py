"""Export a checkpoint as a standard transformers folder: LlavaForConditionalGeneration, or
InternVLForConditionalGeneration for an InternViT + pixel_shuffle_mlp model.

LLaVA: the folder holds config.json (vision_feature_select_strategy "full" for SigLIP, the matching
vision_feature_layer), model.safetensors, the tokenizer with its chat template (string content
as in training, and content parts: an image part is `<image>` + newline), generation_config.json
(stops at <|im_end|>, pad id) and the image processor, and loads offline with
AutoModelForImageTextToText / AutoProcessor / pipeline("image-text-to-text"). It also gets
vlmforge_config.yaml and manifest.json. Models LLaVA cannot express (a pooled avgpool_mlp,
pixel_shuffle_mlp, V2PE with delta != 1, an interpolated tower resolution, tiles or a start / end
wrap in model.images) are refused with the reason; a pooled checkpoint can be exported at full grid with --set model.projector.pool_size=null.

InternVL: config.json (InternViT, the multi_modal_projector, the LM; image_seq_length = visual tokens
per tile), model.safetensors, generation_config.json, the tokenizer with InternVLProcessor's named
image tokens (context token <image>; start / end = model.images.start / end, <img> / </img> for an
imported InternVL, else none) and the chat template, and processor_config.json (InternVLProcessor,
GotOcr2 image processor with vlmforge's mean / std, tiling as model.images says: min_tiles..max_tiles
tiles of the tower's size and a thumbnail when model.images.tiles is true, else one tile per image).
Refused with the reason: a SigLIP / CLIP tower, another projector, V2PE with delta != 1, tiles
without a thumbnail, a start / end that is not one token of the tokenizer.

--format auto (the default): internvl for a pixel_shuffle_mlp model, else llava.

Examples:
  vlmforge export --ckpt runs/sft/final --out exported/my-vlm
  vlmforge export --ckpt runs/internvl3-1b --out exported/internvl3-1b-hf
"""

from __future__ import annotations

import argparse

HELP = "write a checkpoint as a transformers LlavaForConditionalGeneration or InternVLForConditionalGeneration folder"
FORMATS = ("auto", "llava", "internvl")
FORMAT_CLASSES = {"llava": "LlavaForConditionalGeneration", "internvl": "InternVLForConditionalGeneration"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="vlmforge checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write over an existing export in --out")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="llava or internvl; auto: internvl for a pixel_shuffle_mlp projector, else llava")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run setting of the checkpoint's recipe before exporting (repeatable)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from vlmforge.config import save_resolved
    from vlmforge.errors import UserError
    from vlmforge.files import prepare_out_dir, write_manifest
    from vlmforge.model.export import ExportRefused, export_llava
    from vlmforge.model.internvl_format import export_internvl
    from vlmforge.model.saving import load_vlm

    out = Path(args.out)
    prepare_out_dir(out, overwrite=args.overwrite)
    model, tok, cfg = load_vlm(args.ckpt, overrides=args.overrides)
    fmt = args.format
    if fmt == "auto":
        fmt = "internvl" if model.projector.kind == "pixel_shuffle_mlp" else "llava"
    dtype = getattr(torch, args.dtype)
    try:
        if fmt == "internvl":
            export_internvl(model, tok, out, dtype=dtype, trust_remote_code=bool(cfg.model.trust_remote_code))
        else:
            export_llava(model, tok, out, dtype=dtype)
    except ExportRefused as e:
        also = "; LlavaForConditionalGeneration has no pixel-shuffle projector either" if args.format == "auto" and fmt == "internvl" else ""
        raise UserError(f"{e}{also}") from None
    save_resolved(cfg, out, name="vlmforge_config.yaml")
    write_manifest(
        out, "export", inputs={"ckpt": str(Path(args.ckpt).resolve())}, config=cfg,
        counts={"visual_tokens_per_image": model.tokens_per_image}, format=f"transformers {FORMAT_CLASSES[fmt]}",
        dtype=args.dtype,
    )
    images = model.images
    tiles = f", {images.min_tiles}-{images.max_tiles} tiles + thumbnail" if images.tiles and fmt == "internvl" else ""
    unit = "tile" if tiles else "image"
    print(f"exported to {out} ({FORMAT_CLASSES[fmt]}, {model.tokens_per_image} visual tokens per {unit}{tiles})")
    return 0
