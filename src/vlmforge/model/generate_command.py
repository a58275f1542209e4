"""Try a model: answer a prompt about one or more images with a vlmforge checkpoint.

Each `<image>` in the prompt marks where an image goes (in --image order); without markers the
images are put before the prompt. Greedy by default; --temperature/--top-p sample. Generation stops
at `<|im_end|>`. --set changes run settings (e.g. model.projector.pool_size=null, model.v2pe_delta=0.5).

Examples:
  vlmforge generate --ckpt runs/sft/final --image cat.png --prompt "What is in the picture?"
  vlmforge generate --ckpt C --image a.png --image b.png --prompt "<image> vs <image>: which is bigger?"
"""

from __future__ import annotations

import argparse

HELP = "answer a prompt about images with a checkpoint (KV-cached generation)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="vlmforge checkpoint folder (model.safetensors, config.yaml, tokenizer/)")
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    parser.add_argument("--prompt", required=True, help="the user message; <image> marks image positions")
    parser.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run setting of the checkpoint's recipe (repeatable)")


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmforge.arch.tokens import IMAGE_TOKEN
    from vlmforge.errors import UserError
    from vlmforge.imagedecode import ImageDecodeError, decode_image
    from vlmforge.model.decoding import generate
    from vlmforge.model.saving import load_vlm

    images = []
    for path in args.image:
        try:
            with open(path, "rb") as f:
                images.append(decode_image(f.read()))
        except (OSError, ImageDecodeError) as e:
            raise UserError(f"--image {path}: cannot read image: {e}") from None
    prompt = args.prompt
    marks = prompt.count(IMAGE_TOKEN)
    if marks == 0 and images:
        prompt = IMAGE_TOKEN * len(images) + "\n" + prompt
    elif marks != len(images):
        raise UserError(f"the prompt has {marks} {IMAGE_TOKEN} marker(s) but {len(images)} --image given")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, _ = load_vlm(args.ckpt, overrides=args.overrides, device=device)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
    answer = generate(
        model, tok, [messages], [images],
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )[0]
    print(answer)
    return 0
