"""Import a published LLaVA- or InternVL-family checkpoint as a vlmforge checkpoint (the inverse of export).

Layouts: a transformers InternVL folder (InternVLForConditionalGeneration, e.g. OpenGVLab/InternVL3-1B-hf:
InternViT + pixel_shuffle_mlp + the LM; model.images takes the processor's tiling, min_patches..max_patches
tiles and a thumbnail, and wraps each image in <img> ... </img> as InternVLProcessor writes it),
a transformers LLaVA folder (LlavaForConditionalGeneration, e.g. llava-hf/*), and the
original LLaVA repository's (a causal-LM config with mm_vision_tower, mm_projector_type mlp2x_gelu
or aapool_mlp, mm_vision_select_layer; projector weights under model.mm_projector.*), which is the
format of the MLM-Filter judges. A LLaVA-repo checkpoint loads its vision tower from the
mm_vision_tower folder: pass it with --vision-tower (or have it in the local Hugging Face cache);
nothing is downloaded. Weights are read from safetensors, or from .bin state dicts with
torch.load(weights_only=True) only; a file that would run code when loaded is refused, as is an
architecture vlmforge cannot run exactly (the message says why). The output folder loads in
eval, generate, train (--set train.init_from=CKPT) and curate score --scorer mlm --model CKPT.

--format auto (the default) picks InternVL for a config.json with model_type internvl, else LLaVA.

Examples:
  vlmforge import --from InternVL3-1B-hf --out runs/internvl3-1b
  vlmforge import --from llava-1.5-7b-hf --out runs/llava15
  vlmforge import --from mlm-filter-qwen2.5-1.5b-gpt4o --vision-tower siglip-so400m-patch14-384 --out runs/judge
"""

from __future__ import annotations

import argparse

HELP = "import a transformers InternVL or LLaVA, or a LLaVA-repository (MLM-Filter) checkpoint as a vlmforge checkpoint"
FORMATS = ("auto", "internvl", "llava")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, help="the source checkpoint folder")
    parser.add_argument("--out", required=True, help="output checkpoint folder (created; must be empty if it exists)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="source format: internvl (InternVLForConditionalGeneration), llava (llava-hf or LLaVA "
                             "repository); auto: internvl when config.json's model_type is internvl")
    parser.add_argument("--vision-tower", default=None,
                        help="LLaVA-repo layout: the SigLIP / CLIP tower folder mm_vision_tower names")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the source folder)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a tokenizer defined by Python code in its folder (auto_map); off by default")
    parser.add_argument("--name", default=None, help="the recipe name stored in the checkpoint")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlmforge.errors import UserError
    from vlmforge.files import write_manifest
    from vlmforge.model.internvl_format import import_internvl, is_internvl_folder
    from vlmforge.model.llava_import import import_checkpoint
    from vlmforge.model.llava_layouts import read_config

    src, out = Path(args.source), Path(args.out)
    if not src.is_dir():
        raise UserError(f"--from {src}: not a folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty")
    fmt = args.format
    if fmt == "auto":
        fmt = "internvl" if is_internvl_folder(read_config(src)) else "llava"
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if fmt == "internvl":
        if args.vision_tower:
            raise UserError("--vision-tower is for LLaVA-repository checkpoints; an InternVL folder holds its tower")
        model, tok, cfg, plan = import_internvl(src, out, tokenizer=tokenizer, trust_remote_code=args.trust_remote_code,
                                                name=args.name)
    else:
        model, tok, cfg, plan = import_checkpoint(
            src, out, vision_tower=Path(args.vision_tower) if args.vision_tower else None, tokenizer=tokenizer,
            trust_remote_code=args.trust_remote_code, name=args.name,
        )
    write_manifest(
        out, "import", inputs=plan.sources, config=cfg, layout=plan.layout, notes=plan.notes,
        counts={"visual_tokens_per_image": model.tokens_per_image, "vocab": len(tok)},
    )
    images = model.images
    tiles = f", {images.min_tiles}-{images.max_tiles} tiles + thumbnail" if images.tiles else ""
    print(f"imported {plan.layout} checkpoint {src} to {out} ({model.projector.kind}, "
          f"{model.tokens_per_image} visual tokens per {'tile' if tiles else 'image'}{tiles})")
    for note in plan.notes:
        print(f"  note: {note}")
    return 0
