"""``vlmforge preference index|build``: preference pairs for `train.stage: mpo`.

  vlmforge preference index --recipe tiny/mpo --input pairs.jsonl --out runs/pref_index ...
  vlmforge preference build --ckpt runs/tiny-sft --questions mcq:train_mcq.jsonl --out runs/pairs ...

``index`` reads pair files people have (MMPR jsonl, InternVL meta.json, synth pairs) into a
memory-mapped index (vlmforge.data.preference); ``build`` samples a model's answers to questions
with known answers and pairs right with wrong ones (vlmforge.preference.build).
"""

from __future__ import annotations

import argparse

from vlmforge.data.preference import command as index_command
from vlmforge.preference import build_command

HELP = "preference pairs for MPO: index pair files (index), or make pairs from a model's samples (build)"
SUBCOMMANDS = {"index": index_command, "build": build_command}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="preference_command", metavar="{index,build}", required=True)
    for name, module in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return SUBCOMMANDS[args.preference_command].run(args)
