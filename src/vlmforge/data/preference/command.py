"""Index preference pairs once, for MPO training (memory-mapped offsets and token lengths).

  vlmforge preference index --input world/preference/pairs.jsonl --out runs/pref_index --tokenizer runs/tok
  vlmforge preference index --input MMPR/meta.json --out runs/mmpr_index --recipe internvl3/mpo
  vlmforge preference index --input mmpr_part.jsonl --image-root MMPR/images --out IDX --tokenizer TOK

Reads, in any mix:
  - MMPR jsonl rows: {"image": "a.jpg" | ["a.jpg", ...], "question": ..., "chosen": ...,
    "rejected": ...[, "answer_gt": ...]};
  - InternVL's meta.json: {NAME: {"root": IMAGES, "annotation": FILE.jsonl, "repeat_time": R}};
    R < 1 keeps the file's first int(rows * R) rows (as InternVL does), R > 1 repeats its pairs;
  - vlmforge synth's preference/pairs.jsonl: {"image", "prompt": "<image>\\n...", "chosen",
    "rejected", ...}; fields besides these are kept as the pair's metadata.
A question without an <image> marker gets "<image>\\n" per image in front (as InternVL does). Image
paths are relative to --image-root (preference.image_root), a meta.json entry's root, or else the
row file's own folder, and must stay inside it (absolute paths need --allow-absolute-paths).

Writes memory-mapped .npy arrays (byte offsets, token lengths of prompt / chosen / rejected with
visual tokens, image counts) + manifest.json. Bad rows are skipped and counted per reason with
file:line examples in the manifest: unparsable, missing_image, empty_chosen, empty_rejected,
chosen_equals_rejected, prompt_too_long (prompt + longer response > --max-len, default
preference.max_len), path_outside_root, image_marker_mismatch; --strict stops at the first one.

Visual tokens per image come from the recipe's model (--recipe / --set) or --visual-tokens. Flags
left out fall back to the recipe's `preference` section (sources, image_root, max_len, strict, ...).
"""

from __future__ import annotations

import argparse

HELP = "index preference pairs (MMPR jsonl, InternVL meta.json, synth pairs) for MPO training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vlmforge.clitools import add_recipe_args

    parser.add_argument("--input", nargs="+", default=None, metavar="FILE",
                        help="MMPR / synth .jsonl files or InternVL meta.json files (default: preference.sources)")
    parser.add_argument("--out", required=True, help="index folder to write (refused if not empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write over an existing index in --out")
    parser.add_argument("--image-root", default=None,
                        help="folder the rows' image paths are relative to (default: preference.image_root, "
                             "else each row file's folder; a meta.json entry's root wins)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: recipe tokenizer.path)")
    parser.add_argument("--visual-tokens", type=int, default=None, help="tokens per image (default: from the recipe's model)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="longest prompt + response in tokens (default: preference.max_len)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row (names file:line)")
    parser.add_argument("--allow-absolute-paths", action="store_true",
                        help="accept absolute image paths in the rows (default: refused as path_outside_root)")
    add_recipe_args(parser)


def run(args: argparse.Namespace) -> int:

    from vlmforge.arch.geometry import visual_tokens_per_image
    from vlmforge.clitools import image_root_arg, input_files, recipe_from_args
    from vlmforge.config import save_resolved
    from vlmforge.data.preference.build import build_preference_index
    from vlmforge.errors import UserError
    from vlmforge.files import prepare_out_dir

    cfg = recipe_from_args(args)
    pref = cfg.preference
    sources = input_files(args.input, pref.sources, "preference.sources", "an MMPR / synth .jsonl or an InternVL meta.json")
    image_root = image_root_arg(args.image_root, pref.image_root, "preference.image_root")
    tokenizer = args.tokenizer or cfg.tokenizer.path
    if not tokenizer:
        raise UserError("no tokenizer: pass --tokenizer DIR (or set tokenizer.path); token lengths need it")
    visual_tokens = args.visual_tokens if args.visual_tokens is not None else visual_tokens_per_image(cfg.model)
    if visual_tokens < 1:
        raise UserError(f"--visual-tokens must be >= 1, got {visual_tokens}")
    max_len = args.max_len if args.max_len is not None else pref.max_len
    if max_len < 1:
        raise UserError(f"--max-len must be >= 1, got {max_len}")
    prepare_out_dir(args.out, overwrite=args.overwrite)
    manifest = build_preference_index(
        sources,
        args.out,
        tokenizer=tokenizer,
        visual_tokens=visual_tokens,
        max_len=max_len,
        image_root=image_root,
        strict=args.strict or pref.strict,
        allow_absolute_paths=args.allow_absolute_paths or pref.allow_absolute_paths,
        config=cfg,
    )
    save_resolved(cfg, args.out)
    c = manifest["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in manifest["dropped"].items()) or "none"
    if c["pairs"] == 0:  # an index of nothing would only fail later, in training
        raise UserError(
            f"{'--input' if args.input else 'preference.sources'} {' '.join(map(str, sources))}: no usable pair of {c['rows_read']} rows read (skipped: {dropped}); "
            f"examples with file:line in {args.out}/manifest.json; fix the data and rerun with --overwrite"
        )
    print(
        f"preference index: {c['pairs']} pairs ({c['rows_kept']} rows kept of {c['rows_read']} read from "
        f"{c['files']} file(s); {c['with_image']} with images, {c['text_only']} text-only); skipped: {dropped}; "
        f"{visual_tokens} tokens/image, max_len {max_len} -> {args.out}"
    )
    return 0
