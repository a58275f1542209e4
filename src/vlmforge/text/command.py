"""Train or inspect tokenizers.

  vlmforge tokenizer train --corpus world/text/corpus.txt --out runs/tok [--vocab-size 1024]
  vlmforge tokenizer train --corpus world --out runs/tok
      (a synth world folder: its text/corpus.txt plus the turns of its sft/llava.json, so the
      instruction prompts the model is trained and evaluated with are whole tokens, not letters)
      Trains a byte-level BPE offline (tokenizers library) on text files (one sentence per line),
      with special tokens <|endoftext|> <|im_start|> <|im_end|> <image> and a Qwen-shaped chat
      template whose assistant turns are marked for loss masking. The folder is a standard
      transformers tokenizer folder (AutoTokenizer.from_pretrained loads it offline) and also
      holds the resolved recipe and a manifest.json.

  vlmforge tokenizer info PATH_OR_HUB_ID
      Loads any tokenizer the way training does and prints its special ids and a rendered
      example chat with the supervised (assistant) tokens in [[...]].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmforge.clitools import add_recipe_args, recipe_from_args
from vlmforge.errors import UserError

HELP = "train a small byte-level BPE tokenizer offline, or inspect a tokenizer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    t.add_argument(
        "--corpus", nargs="+", required=True, metavar="FILE",
        help="UTF-8 text files, one text per line (a synthetic-world folder means its text/corpus.txt "
        "and the turns of its sft/llava.json)",
    )
    t.add_argument("--out", required=True, help="output folder (transformers tokenizer folder; refused if not empty)")
    t.add_argument("--overwrite", action="store_true", help="write over an existing tokenizer in --out")
    t.add_argument("--vocab-size", type=int, default=None, help="default: recipe tokenizer.vocab_size")
    t.add_argument("--min-frequency", type=int, default=None, help="default: recipe tokenizer.min_frequency")
    add_recipe_args(t)
    i = sub.add_parser("info", help="print a tokenizer's special tokens and an example chat with its loss mask")
    i.add_argument("path", help="tokenizer folder or hub id")
    i.add_argument("--trust-remote-code", action="store_true")


def _turn_lines(path) -> list[str]:
    """The text lines of a LLaVA json's turns (no <image> markers) and the chat template's words."""
    from vlmforge.arch.tokens import IMAGE_TOKEN
    from vlmforge.text.chat import DEFAULT_SYSTEM_PROMPT

    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read SFT conversations {path}: {e}") from e
    roles = {"human": "user", "gpt": "assistant"}
    lines = []
    for r in records:
        # The chat template's own words (system prompt, role names) occur once per conversation or
        # turn in everything the model reads: training on them makes them a few tokens instead of one per byte.
        lines += ["system", DEFAULT_SYSTEM_PROMPT]
        for turn in r.get("conversations", []):
            lines.append(roles.get(turn.get("from"), str(turn.get("from", ""))))
            lines += [line for line in str(turn.get("value", "")).replace(IMAGE_TOKEN, "").splitlines() if line.strip()]
    return lines


def _train(args) -> int:
    from vlmforge.config import save_resolved
    from vlmforge.config.loader import set_value
    from vlmforge.files import prepare_out_dir, write_manifest
    from vlmforge.text.tokenization import describe, read_corpus, train_tokenizer

    cfg = recipe_from_args(args)
    if args.vocab_size is not None:
        set_value(cfg, "tokenizer.vocab_size", args.vocab_size, "--vocab-size")
    if args.min_frequency is not None:
        set_value(cfg, "tokenizer.min_frequency", args.min_frequency, "--min-frequency")
    corpus, conversations = [], []
    for p in map(Path, args.corpus):
        if p.is_dir():  # a synthetic world
            corpus.append(p / "text" / "corpus.txt")
            if (p / "sft" / "llava.json").is_file():
                conversations.append(p / "sft" / "llava.json")
        else:
            corpus.append(p)
    for p in corpus:
        if not p.is_file():
            raise UserError(f"corpus file not found: {p}")
    if cfg.tokenizer.vocab_size < 300:
        raise UserError(f"vocab size {cfg.tokenizer.vocab_size} is too small: byte-level BPE needs >= 300 (256 bytes + specials)")
    lines = list(read_corpus(corpus)) + [line for p in conversations for line in _turn_lines(p)]
    if not lines:
        raise UserError(f"corpus is empty: {' '.join(map(str, corpus))}")
    prepare_out_dir(args.out, overwrite=args.overwrite)
    tok = train_tokenizer(lines, args.out, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    save_resolved(cfg, args.out)
    info = describe(tok)
    write_manifest(
        args.out,
        "tokenizer",
        inputs=[str(p.resolve()) for p in corpus + conversations],
        config=cfg,
        counts={"lines": len(lines), "vocab": info["len"]},
        tokenizer=info,
    )
    print(f"tokenizer: {info['len']} tokens trained on {len(lines)} lines -> {args.out}")
    return 0


def _info(args) -> int:
    from vlmforge.arch.tokens import IMAGE_TOKEN
    from vlmforge.text.chat import encode_conversation
    from vlmforge.text.tokenization import describe, load_tokenizer

    tok = load_tokenizer(args.path, trust_remote_code=args.trust_remote_code, key="tokenizer info PATH")
    for k, v in describe(tok).items():
        print(f"{k}: {v}")
    msgs = [
        {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is in the picture?"},
        {"role": "assistant", "content": "A red circle."},
    ]
    ids, mask = encode_conversation(tok, msgs)
    out, open_ = [], False
    for i, m in zip(ids, mask):
        if m and not open_:
            out.append("[[")
        if not m and open_:
            out.append("]]")
        open_ = bool(m)
        out.append(tok.decode([i]))
    print("example (supervised in [[...]]):")
    print("".join(out) + ("]]" if open_ else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    return _train(args) if args.action == "train" else _info(args)
