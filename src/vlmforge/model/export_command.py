"""Export a checkpoint as a standard transformers LLaVA folder (LlavaForConditionalGeneration).

The folder holds config.json (vision_feature_select_strategy "full" for SigLIP, the matching
vision_feature_layer), model.safetensors, the tokenizer with its chat template (string content
as in training, and content parts: an image part is `<image>` + newline), generation_config.json
(stops at <|im_end|>, pad id) and the image processor, and loads offline with
AutoModelForImageTextToText / AutoProcessor / pipeline("image-text-to-text"). It also gets
vlmforge_config.yaml and manifest.json. Models LLaVA cannot express (a pooled avgpool_mlp,
pixel_shuffle_mlp, V2PE with delta != 1, an interpolated tower resolution) are refused with the
reason; a pooled checkpoint can be exported at full grid with --set model.projector.pool_size=null.

Example:
  vlmforge export --ckpt runs/sft/final --out exported/my-vlm
"""

from __future__ import annotations

import argparse

HELP = "write a checkpoint as a transformers LlavaForConditionalGeneration folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="vlmforge checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write over an existing export in --out")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run setting of the checkpoint's recipe before exporting (repeatable)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from vlmforge.config import save_resolved
    from vlmforge.errors import UserError
    from vlmforge.files import prepare_out_dir, write_manifest
    from vlmforge.model.export import ExportRefused, export_llava
    from vlmforge.model.saving import load_vlm

    out = Path(args.out)
    prepare_out_dir(out, overwrite=args.overwrite)
    model, tok, cfg = load_vlm(args.ckpt, overrides=args.overrides)
    try:
        export_llava(model, tok, out, dtype=getattr(torch, args.dtype))
    except ExportRefused as e:
        raise UserError(str(e)) from None
    save_resolved(cfg, out, name="vlmforge_config.yaml")
    write_manifest(
        out, "export", inputs={"ckpt": str(Path(args.ckpt).resolve())}, config=cfg,
        counts={"visual_tokens_per_image": model.tokens_per_image}, format="transformers LlavaForConditionalGeneration",
        dtype=args.dtype,
    )
    print(f"exported to {out} (LlavaForConditionalGeneration, {model.tokens_per_image} visual tokens per image)")
    return 0
