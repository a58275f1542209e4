"""The one entry point: ``vlmforge <command> ...``.

Each command lives in its stage's package as a module with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; its module name ends in ``command``. ``--help`` imports every command
module, so at import time a command module imports only light things (the standard library,
``vlmforge.errors``, ``vlmforge.clitools`` with the recipe loader) and imports its stage's code
(torch, transformers, numpy, ...) inside ``run``: command modules are the one place outside
optional extras where function-level imports are allowed (tests/layers.py).
``main(argv)`` is callable in-process (tests use it). A UserError / ConfigError prints one line and
returns 2; ``vlmforge --debug <command>`` prints its traceback first.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Sequence

from vlmforge import __version__
from vlmforge.errors import ConfigError, UserError

# (command, module). Order is the order shown in --help: the data flows top to bottom.
COMMANDS: list[tuple[str, str]] = [
    ("synth", "vlmforge.synth.command"),
    ("tokenizer", "vlmforge.text.command"),
    ("curate", "vlmforge.curate.command"),
    ("vision-pretrain", "vlmforge.vision.command"),
    ("pack", "vlmforge.data.pretrain.command"),
    ("sft-index", "vlmforge.data.sft.command"),
    ("model-info", "vlmforge.model.info_command"),
    ("plan", "vlmforge.plan.command"),
    ("train", "vlmforge.train.command"),
    ("generate", "vlmforge.model.generate_command"),
    ("preference", "vlmforge.preference.command"),
    ("prm-data", "vlmforge.rollouts.command"),
    ("prm-score", "vlmforge.critic.command"),
    ("eval", "vlmforge.eval.command"),
    ("export", "vlmforge.model.export_command"),
    ("import", "vlmforge.model.import_command"),
    ("demo", "vlmforge.demo.command"),
    ("recipes", "vlmforge.config.command"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmforge",
        description=(
            "vlmforge: build vision-language models from raw image-text pairs to an evaluated, "
            "exported model. Data flows synth/curate -> pack -> train -> eval -> export; "
            "`vlmforge demo` runs it all on the built-in synthetic world."
        ),
    )
    parser.add_argument("--version", action="version", version=f"vlmforge {__version__}")
    parser.add_argument(
        "--debug", action="store_true",
        help="on an input error, also print its traceback (default: one line naming the file, key or path)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and (modname == e.name or modname.startswith(e.name + ".")):  # stage not in this build
                continue
            raise
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=doc or mod.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (ConfigError, UserError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"vlmforge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
