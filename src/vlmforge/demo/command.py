"""Run the whole pipeline on the built-in synthetic world and show that the model learned.

synth -> tokenizer -> vision-pretrain (the VLM's frozen vision tower, on labelled objects) ->
curate (train a filter network, score, filter, dedup) -> pack -> pretrain -> SFT ->
preference build (the SFT model's own replies to training questions, judged right or wrong) ->
MPO -> eval (before training, after pretraining, after SFT, after MPO) -> report.

Everything lands in --out: one folder per stage (each with its config.yaml and manifest.json)
and report.html with loss curves and every benchmark score next to chance level.

Examples:
  vlmforge demo                          # default size: minutes on a laptop CPU
  vlmforge demo --size tiny --out /tmp/d # seconds-scale smoke run (what CI runs)
  vlmforge demo --size large             # more data and steps, higher scores
  vlmforge demo --pretrain-set train.epochs=4 --sft-set train.epochs=8   # change any stage's config
  vlmforge demo --mpo-set train.lr=1e-4 --mpo-set mpo.beta=0.2
"""

from __future__ import annotations

import argparse

HELP = "run synth -> curate -> pack -> pretrain -> SFT -> MPO -> eval -> report on the built-in world"


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
    )
    return 0
