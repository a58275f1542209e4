"""Pretrain a small vision tower on labelled objects (each cell of a grid over the image: what
object is there, if any, and its attributes), then hand it to a VLM as its vision tower.

The output folder is a transformers CLIPVisionModel / SiglipVisionModel folder (safetensors +
config.json + preprocessor_config.json), plus labels.json, metrics.jsonl (held-out accuracy per
epoch), config.yaml and manifest.json. Use it with --set model.vision.pretrained=OUT (and the same
model.vision.feature_layer as vision_pretrain.feature_layer).

Input: objects.jsonl rows {"image": path relative to the file, "objects": [{"shape": ..,
"color": .., "size": .., "position": "top left"} | {..., "cell": [row, col]}]}; every key other
than position/cell is an attribute to learn. `vlmforge synth` writes one as WORLD/vision/.

Examples:
  vlmforge vision-pretrain --data world/vision --out runs/vision
  vlmforge vision-pretrain --data world/vision --out runs/vision --set vision_pretrain.epochs=10
"""

from __future__ import annotations

import argparse

HELP = "pretrain a small vision tower on labelled objects (for a VLM's model.vision.pretrained)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vlmforge.clitools import add_recipe_args

    p.add_argument("--data", required=True, help="objects.jsonl or its folder (WORLD/vision)")
    p.add_argument("--out", required=True, help="output tower folder (refused if not empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write over an existing tower in --out")
    p.add_argument("--epochs", type=int, default=None, help="vision_pretrain.epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_recipe_args(p)


def run(args: argparse.Namespace) -> int:
    from vlmforge import dist
    from vlmforge.clitools import recipe_from_args
    from vlmforge.config.loader import set_value
    from vlmforge.files import prepare_out_dir
    from vlmforge.vision.pretrain import pretrain_vision

    cfg = recipe_from_args(args)
    if args.epochs is not None:
        set_value(cfg, "vision_pretrain.epochs", args.epochs, "--epochs")
    if not dist.is_main():  # a tiny tower: one process trains
        dist.barrier()
        return 0
    prepare_out_dir(args.out, overwrite=args.overwrite)
    acc = pretrain_vision(args.data, args.out, cfg.vision_pretrain, config=cfg, progress=not args.no_progress)
    dist.barrier()
    print(f"wrote vision tower {args.out}: held-out accuracy "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return 0
