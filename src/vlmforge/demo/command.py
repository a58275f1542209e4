"""Run the whole pipeline on the built-in synthetic world and show that the model learned.

What it trains: a small VLM from scratch on images of coloured shapes on a 3x3 grid. A vision
tower is pretrained on the world's labelled objects and frozen; a filter network learns to spot
mismatched captions and curates the caption crawl; a 4-layer Qwen2 LM with a projector is
pretrained on the packed captions, fine-tuned on instructions (SFT, with live evaluations), then
trained with MPO on right-vs-wrong pairs of its own sampled replies to training questions; a
process reward model (PRM) learns Monte Carlo step labels of its own worked solutions and picks
the best of 8 sampled solutions to held-out reasoning problems.

synth -> tokenizer -> vision-pretrain -> curate (train filter, score, filter, dedup) -> pack ->
pretrain -> SFT -> preference build -> MPO -> prm-data -> PRM -> Best-of-8, with eval on held-out
images before training and after every stage, then the report.

What the numbers mean (scores.txt and report.html in --out, each next to its chance level):
  MCQ, likelihood    the option text the model finds most likely is the right one (chance 0.25)
  MCQ, letters       CircularEval: the right letter in all 4 rotations of the options (chance
                     1/256); "accuracy" counts the first rotation only (chance 0.25)
  VQA accuracy       one-word answers vs 10 references, VQAv2's min(matches / 3, 1) (chance ~0)
  POPE F1            "Is there a <object>?" yes/no; F1 of "yes" (always answering yes: 0.67)
  reasoning          synth-math: count shapes, then add / subtract, "The answer is N." (chance ~0)
  Best-of-N          accuracy when the PRM (or the last-step ORM, or a majority vote) picks one of
                     N sampled solutions; "pass" = any of the N is right (the ceiling)
  MPO reward margin  how much more than SFT the model prefers the right reply (> 0: MPO learned)
The report also shows a dozen held-out questions answered after SFT and after MPO, what curation
kept and dropped per injected fault, the loss curves, the benchmarks during SFT, and each stage's
time and exact command (rerun any stage by pasting it).

Examples:
  vlmforge demo                          # default size: about 20 minutes on a 2-core CPU
  vlmforge demo --size tiny --out /tmp/d # seconds-scale smoke run (what CI runs)
  vlmforge demo --size large             # more data and steps, higher scores
  vlmforge demo --pretrain-set train.epochs=4 --sft-set train.epochs=8   # change any stage's config
  vlmforge demo --mpo-set train.lr=1e-4 --mpo-set mpo.beta=0.2
"""

from __future__ import annotations

import argparse

HELP = "run synth -> curate -> pack -> pretrain -> SFT -> MPO -> PRM -> Best-of-N -> report on the built-in world"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vlmforge.demo.presets import SIZES

    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="how much data and training: a folder of recipes/demo/ (default: default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of training")
    p.add_argument("--no-curate", action="store_true", help="pack the raw caption shards without curation")
    p.add_argument("--overwrite", action="store_true", help="remove an existing --out first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to every stage (repeatable), e.g. synth.image_size=72")
    p.add_argument("--pretrain-set", dest="pretrain_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the pretraining stage only, e.g. train.lr=1e-3")
    p.add_argument("--sft-set", dest="sft_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the SFT stage only, e.g. train.epochs=8")
    p.add_argument("--mpo-set", dest="mpo_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the MPO stage (and its preference index) only, e.g. mpo.beta=0.2")
    p.add_argument("--prm-set", dest="prm_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the process reward model's training (and its index) only, e.g. train.epochs=3")


def run(args: argparse.Namespace) -> int:
    from vlmforge.demo.pipeline import run_demo

    run_demo(
        out=args.out,
        size=args.size,
        seed=args.seed,
        curate=not args.no_curate,
        overwrite=args.overwrite,
        threads=args.threads,
        overrides=args.overrides,
        pretrain_overrides=args.pretrain_overrides,
        sft_overrides=args.sft_overrides,
        mpo_overrides=args.mpo_overrides,
        prm_overrides=args.prm_overrides,
    )
    return 0
