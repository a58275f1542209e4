"""Generate the built-in synthetic world: a small, seeded visual world a tiny model learns on CPU.

Scenes are light backgrounds with 1-4 shapes (circle, square, triangle, star by default) in six
colours, two sizes and the cells of a 3x3 grid. From one seed it writes:

  DIR/captions/NNNNN.tar            caption shards in img2dataset's webdataset layout
                                    ({key}.jpg {key}.txt {key}.json; json: uid caption url key status
                                    error_message width height original_width original_height sha256)
  DIR/captions/NNNNN.parquet        one row per sample, same fields
  DIR/captions/NNNNN_stats.json     img2dataset shard stats
  DIR/captions/faults.jsonl         ground truth of every injected fault ({key, shard, fault, ...})
  DIR/captions/scenes.jsonl         what each image shows ({key, scene: {objects: [...]}})
  DIR/sft/llava.json                LLaVA instruction data (single- and multi-turn), images in sft/images/
  DIR/eval/{mcq,vqa,pope}.jsonl     held-out benchmarks on unseen images (eval/images/)
  DIR/eval/math.jsonl               held-out reasoning problems (count, then add / subtract /
                                    multiply) with worked steps (synth.num_math; task synth-math)
  DIR/eval/math_steps.jsonl         solutions with a known first wrong step, '+'/'-' per step
                                    (synth.num_math_steps; process reward model evaluation)
  DIR/eval/multi.jsonl              held-out questions about two images at once ("images": [a, b];
                                    which image has more circles, ...; synth.num_multi; task
                                    synth-multi); synth.sft_multi_image_frac of the SFT
                                    conversations show two images the same way
  DIR/preference/pairs.jsonl        {prompt, image, chosen, rejected} pairs (preference/images/)
  DIR/questions/{mcq,vqa,pope,math}.jsonl  training-split questions in the eval formats, on training images
                                    (questions/images/, no scene an eval image shows), and
  DIR/questions/long_answers.jsonl  {image, question, answer} detailed descriptions: what
                                    `vlmforge preference build` asks (never the eval sets)
  DIR/text/corpus.txt               text-only corpus about the same world, one document per line
  DIR/vision/objects.jsonl          labelled images ({id, image, objects: [{shape, color, size,
                                    position}]}) for `vlmforge vision-pretrain` (vision/images/)
  DIR/config.yaml, DIR/manifest.json

Image paths in json/jsonl files are relative to the folder of the file naming them. Faults
(mismatched captions, exact and near duplicates, truncated JPEGs, non-image bytes, empty captions,
grayscale, CMYK and RGBA images) are set by synth.faults.*_frac; --clean turns them all off.

Examples:
  vlmforge synth --out world
  vlmforge synth --out world --seed 1 --set synth.num_captions=20000 --set synth.image_size=96
"""

from __future__ import annotations

import argparse
import json
import time

from vlmforge.clitools import add_recipe_args, recipe_from_args

HELP = "generate the built-in synthetic world (caption shards, SFT, benchmarks, preferences, text)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=None, help="world seed (default: recipe synth.seed)")
    parser.add_argument("--clean", action="store_true", help="inject no faults into the caption shards")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous world in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_recipe_args(parser)


def run(args: argparse.Namespace) -> int:
    from vlmforge.synth.faults import FAULT_TYPES
    from vlmforge.synth.writer import generate_world

    cfg = recipe_from_args(args)
    if args.seed is not None:
        cfg.synth.seed = args.seed
    if args.clean:
        for t in FAULT_TYPES:
            cfg.synth.faults[f"{t}_frac"] = 0.0
    t0 = time.perf_counter()
    summary = generate_world(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    c = summary["captions"]
    print(
        f"synthetic world (seed {cfg.synth.seed}) written to {args.out} in {time.perf_counter() - t0:.1f}s: "
        f"{c['captions']} captions in {c['shards']} shards ({c['captions'] - c['clean']} faulty), "
        f"{summary['sft']['conversations']} SFT conversations, "
        f"{summary['eval']['mcq']} MCQ / {summary['eval']['vqa']} VQA / {summary['eval']['pope']} POPE / "
        f"{summary['eval']['math']} math / {summary['eval']['multi']} two-image questions, "
        f"{summary['preference']['pairs']} preference pairs, {summary['text']['lines']} text lines"
    )
    if not args.quiet:
        print("faults:", json.dumps(c["faults"]))
    return 0
