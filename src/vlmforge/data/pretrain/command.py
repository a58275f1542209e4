"""Pack caption shards into fixed-length training sequences.

Reads caption shards in img2dataset's webdataset layout (NNNNN.tar with {key}.jpg/.txt/.json,
including shards img2dataset wrote), tokenizes the captions with the recipe's tokenizer and gives
each sample its multimodal length: N visual tokens (from the model section: e.g. 144 with a
12x12 pooled projector, 729 at full resolution), the caption, and <|im_end|>. Samples are packed,
one window (pack.window samples) at a time, into sequences of at most pack.max_len tokens with an
exact-fit packer that closes the gaps first-fit-decreasing leaves.

Output (no pickle): packed shards NNNNN.tar + NNNNN.index.json (token ids as .npy, per-sample
lengths, each image's original bytes), config.yaml and manifest.json with counts, fill statistics,
a length histogram, the achieved text:multimodal ratio, and every dropped or truncated sample
counted by reason. Bad samples (damaged tar members, undecodable images, empty captions) are
skipped and counted; --set pack.strict=true makes the first one an error instead.

Optional text-only mixing (InternVL3-style): --set pack.text_corpus=corpus.jsonl
--set pack.text_ratio=0.3333 mixes text documents into the same packs at 1:3 text:multimodal tokens.

InternVL dynamic resolution: --set model.images.tiles=true (model.images.max_tiles, min_tiles,
thumbnail) gives each image the tiles its aspect ratio asks for, and the pack lengths count them
(tiles x visual tokens per tile); model.images.start / end (e.g. "<img>" / "</img>") wrap each
image's placeholders. The manifest then records the layout and tiles per image; training refuses a
folder packed with another layout than its recipe's.

Example:
  vlmforge pack --recipe tiny/pretrain --in data/curated --out data/packed
"""

from __future__ import annotations

import argparse

HELP = "pack caption shards into fixed-length sequences (packed shards + manifest)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vlmforge.clitools import add_recipe_args

    add_recipe_args(p)
    p.add_argument("--in", dest="inputs", action="append", required=True, metavar="SHARDS",
                   help="caption shards: folder, glob, brace pattern or tar file (repeatable)")
    p.add_argument("--out", required=True, help="output folder for packed shards")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub id (default: the recipe's tokenizer.path)")
    p.add_argument("--overwrite", action="store_true", help="replace packed shards already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from vlmforge.clitools import recipe_from_args
    from vlmforge.data.pretrain.plan import pack_shards
    from vlmforge.errors import UserError

    cfg = recipe_from_args(args)
    tok = args.tokenizer or cfg.tokenizer.path
    if not tok:
        raise UserError("no tokenizer: pass --tokenizer DIR or set tokenizer.path in the recipe")
    manifest = pack_shards(
        cfg, args.inputs, args.out, tok, overwrite=args.overwrite, progress=not args.no_progress
    )
    c, f = manifest["counts"], manifest["fill"]
    print(
        f"packed {c['samples_packed']} samples ({c['text_samples']} text) into {c['packs']} packs "
        f"in {c['shards']} shards: mean fill {f['mean_fill']:.4f} (lower bound {f['lower_bound_fill']:.4f}); "
        f"dropped {sum(manifest['dropped'].values())}, truncated {c['truncated']} -> {args.out}/manifest.json"
    )
    if "images" in manifest:
        im = manifest["images"]
        print(f"  {im['images']} images in {im['tiles']} tiles (mean {im['tiles_per_image']['mean']:.2f}, max "
              f"{im['tiles_per_image']['max']} per image), {im['visual_tokens']['total']} visual tokens")
    return 0
