"""Index LLaVA-format SFT data once, for memory-light random access in training.

  vlmforge sft-index --input data/llava.json [more.jsonl ...] --out runs/sft_index \\
      --image-root data/images --tokenizer runs/tok [--lengths exact|estimate] [--workers 4]

Reads .json (one JSON array) or .jsonl (one record per line) files with LLaVA records
(`image`: path or list of paths relative to --image-root, `conversations`: [{"from": "human"|"gpt"
|"system", "value": "...<image>..."}]; text-only records have no `image`). Writes memory-mapped
.npy arrays (byte offsets, token lengths incl. visual tokens, image counts) + manifest.json.
Bad records (unparsable JSON, missing image file, <image> markers that do not match the images,
no assistant turn, an image path leading out of --image-root: path_outside_root) are skipped and
counted per reason with file:line examples in the manifest; --strict stops at the first one
instead. Absolute image paths need --allow-absolute-paths (or sft.allow_absolute_paths=true).

An InternVL meta file in --input (detected by content: a JSON object of named entries) mixes
sources: {NAME: {"root": IMAGES, "annotation": FILE.jsonl|.json, "repeat_time": R,
"data_augment": true|false, "max_dynamic_patch": N}}. Each source's image paths are relative to its
root; R < 1 reads the file's first int(rows * R) records, R > 1 repeats its kept records (floor(R)
times, then the first fraction once more); data_augment switches random JPEG quality on for its
images in training; max_dynamic_patch is recorded for tiling. The manifest reports per source the
rows read, kept and dropped by reason and its share of the index's samples and tokens:

  vlmforge sft-index --input meta.json --out runs/sft_index --tokenizer runs/tok

Visual tokens per image come from the recipe's model (--recipe/--set) or --visual-tokens.
With InternVL's dynamic tiles (--set model.images.tiles=true, model.images.max_tiles=N) or a
wrap around each image (model.images.start="<img>", model.images.end="</img>"), each image's
tiles and placeholders are counted with the recipe's layout (tiles: from its size, read from its
file header, no decode; a meta source's max_dynamic_patch is its tile budget); the index stores
each record's visual tokens and must be trained with the same layout. Tiles need the image files,
so records outside a meta file need --image-root (or sft.image_root):

  vlmforge sft-index --recipe internvl3/sft --input meta.json --out runs/sft_index --tokenizer runs/tok
Lengths: `exact` tokenizes every record with the chat template (what packing needs);
`estimate` is much faster (bytes per token, calibrated on the first records when a tokenizer is
given); packing then moves a conversation that overflows its pack to an extra row.
Flags left out fall back to the recipe's `sft` section (sources, image_root, lengths, ...).
"""

from __future__ import annotations

import argparse

HELP = "index LLaVA-format SFT json/jsonl once (memory-mapped offsets, lengths, image flags)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vlmforge.clitools import add_recipe_args

    parser.add_argument("--input", nargs="+", default=None, metavar="FILE",
                        help="LLaVA .json / .jsonl files or InternVL meta files (detected by content)")
    parser.add_argument("--out", required=True, help="index folder to write (refused if not empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write over an existing index in --out")
    parser.add_argument("--image-root", default=None,
                        help="folder the records' image paths are relative to (a meta file's sources have their own root)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: recipe tokenizer.path)")
    parser.add_argument("--lengths", choices=("exact", "estimate"), default=None)
    parser.add_argument("--visual-tokens", type=int, default=None,
                        help="tokens per image, per tile with model.images.tiles (default: from the recipe's model)")
    parser.add_argument("--no-check-images", action="store_true", help="do not check that image files exist")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record (names file:line)")
    parser.add_argument("--allow-absolute-paths", action="store_true",
                        help="accept absolute image paths in the records (default: refused as path_outside_root)")
    parser.add_argument("--workers", type=int, default=None, help="parser processes (default: recipe sft.index_workers)")
    add_recipe_args(parser)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from vlmforge.arch.geometry import image_layout
    from vlmforge.clitools import image_root_arg, input_files, recipe_from_args
    from vlmforge.config import save_resolved
    from vlmforge.data.sft.build import build_index, expand_sources
    from vlmforge.errors import UserError
    from vlmforge.files import prepare_out_dir
    from vlmforge.text.tokenization import load_tokenizer

    cfg = recipe_from_args(args)
    sft = cfg.sft
    sources = input_files(args.input, sft.sources, "sft.sources", "a LLaVA .json or .jsonl, or an InternVL meta file")
    image_root = image_root_arg(args.image_root, sft.image_root, "sft.image_root")
    tokenizer = args.tokenizer or cfg.tokenizer.path
    lengths = args.lengths or sft.lengths
    if lengths == "exact" and not tokenizer:
        raise UserError("exact lengths need a tokenizer: pass --tokenizer DIR (or --lengths estimate)")
    wrap = cfg.model.images.start or cfg.model.images.end
    if wrap and not tokenizer:
        raise UserError("model.images.start/end wrap each image in text: pass --tokenizer DIR to turn it into ids")
    layout = image_layout(cfg.model, load_tokenizer(tokenizer) if wrap else None)
    if args.visual_tokens is not None:
        if args.visual_tokens < 1:
            raise UserError(f"--visual-tokens must be >= 1, got {args.visual_tokens}")
        layout = dataclasses.replace(layout, tokens_per_tile=int(args.visual_tokens))
    visual_tokens = layout.tokens_per_tile
    allow_absolute = args.allow_absolute_paths or sft.allow_absolute_paths
    if layout.needs_sizes and image_root is None and not allow_absolute:
        plain = [s.path for s in expand_sources(sources, None) if s.meta_file is None]
        if plain:  # every image record would be dropped as missing_image
            raise UserError(f"--image-root: model.images.tiles reads every image's size, but {plain[0]} has no image "
                            f"root: pass --image-root DIR (or set sft.image_root), the folder its image paths are "
                            f"relative to")
    prepare_out_dir(args.out, overwrite=args.overwrite)
    try:
        manifest = build_index(
            sources,
            args.out,
            layout=layout,
            image_root=image_root,
            tokenizer=tokenizer,
            lengths=lengths,
            check_images=sft.check_images and not args.no_check_images,
            strict=args.strict or sft.strict,
            allow_absolute_paths=allow_absolute,
            workers=args.workers or sft.index_workers,
            config=cfg,
        )
    except FileNotFoundError as e:  # an input file that is not there (SFTDataError is a UserError already)
        raise UserError(str(e)) from None
    save_resolved(cfg, args.out)
    c = manifest["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in manifest["dropped"].items()) or "none"
    if c["records"] == 0:  # an index of nothing would only fail later, in training
        raise UserError(
            f"--input {' '.join(map(str, sources))}: no usable record of {c['scanned']} scanned (skipped: {dropped}); "
            f"examples with file:line in {args.out}/manifest.json; fix the data and rerun with --overwrite"
        )
    print(
        f"sft-index: {c['records']} records ({c['with_image']} with images, {c['text_only']} text-only) "
        f"of {c['scanned']} scanned; skipped: {dropped}; {lengths} lengths, {visual_tokens} tokens/"
        f"{'tile' if layout.tiling is not None else 'image'} -> {args.out}"
    )
    if layout is not None and layout.dynamic:
        t = manifest["tiles"]
        hist = ", ".join(f"{k}: {v}" for k, v in t["per_image_histogram"].items()) or "none"
        print(f"  images as {layout.describe()}: {t['images']} images, {t['tiles']} tiles "
              f"({t['per_image_mean']:.2f} per image, max {t['per_image_max']}; images per tile count {hist}); "
              f"visual tokens per record mean {t['visual_tokens_mean']:.1f}, max {t['visual_tokens_max']}")
    if any(s["meta_file"] for s in manifest["sources"]):  # a mixture: what each source became
        for s in manifest["sources"]:
            print(f"  {s['name'] or s['path']}: {s['rows_kept']} of {s['rows_read']} read ({s['rows']} in the file) "
                  f"x repeat_time {s['repeat_time']:g} -> {s['samples']} samples ({100 * s['share_samples']:.1f}%), "
                  f"{s['tokens']} tokens ({100 * s['share_tokens']:.1f}%)"
                  + (", JPEG augmented" if s["data_augment"] else ""))
    return 0
