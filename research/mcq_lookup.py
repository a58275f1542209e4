"""Can the demo's language model learn to answer multiple choice with a letter? (demo diagnosis)

Text only, the answer stated in the prompt itself, so only the option lookup is tested:

    mmbench layout (letter BEFORE its option, as every MCQ benchmark writes it):
        The star is red. What color is the star?
        A. blue / B. red / C. green / D. yellow   (one option per line, MMBench suffix)  -> "B"
    forward layout (control: the same tokens with each letter AFTER its option):
        ... . blue / A / . red / B / . green / C / . yellow / D ...                       -> "B"

For each layout the LM preset is trained from random weights on fresh batches (loss on the
letter only); letter accuracy is printed as it trains, next to chance (0.25), and the final
accuracies side by side. The forward layout asks whether the letter's place is the obstacle (the
benchmark layout needs the token BEFORE the matching option, induction copies the one AFTER a match).
`--optimizers adamw,muon` trains each layout with both optimizers (vlmforge's `train.optimizer`).

    python research/mcq_lookup.py --tokenizer demo_out/tokenizer [--preset small-qwen2] [--steps 600]
    python research/mcq_lookup.py --tokenizer demo_out/tokenizer --layouts mmbench --optimizers adamw,muon

Measured results: docs/experiments.md.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]
SUFFIX = "Answer with the option's letter from the given choices directly."


def example(rng: random.Random, layout: str) -> tuple[str, str]:
    shape, color = rng.choice(SHAPES), rng.choice(COLORS)
    options = COLORS[:]
    rng.shuffle(options)
    if layout == "mmbench":
        lines = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
    else:
        # same tokens as the mmbench lines ("A" "." " red" "\n"), the letter moved after its option
        lines = "\n".join(f". {o}\n{'ABCD'[i]}" for i, o in enumerate(options))
    return f"The {shape} is {color}. What color is the {shape}?\n{lines}\n{SUFFIX}\n", "ABCD"[options.index(color)]


def train_lookup(tok, args, layout: str, optimizer: str = "adamw") -> float:
    """Train a fresh LM on one layout with vlmforge's optimizer (``train.optimizer``); returns the
    letter accuracy over the last `--every` steps."""
    from vlmforge.config import load_recipe
    from vlmforge.config.train import TrainConfig
    from vlmforge.model.build import build_llm
    from vlmforge.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.llm = build_llm(load_recipe(None, [f"model.llm.preset={args.preset}"]).model, vocab_size=len(tok))
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=args.lr, muon_lr=args.muon_lr, weight_decay=0.01))
    model = model.llm
    rng, t0, hits, seen, last_acc = random.Random(0), time.perf_counter(), 0, 0, float("nan")
    print(f"{layout} layout - {args.preset}, batch {args.batch_size}, {optimizer} (lr {args.lr}"
          f"{f', muon lr {args.muon_lr}' if optimizer == 'muon' else ''}): letter accuracy (chance 0.25)")
    for step in range(1, args.steps + 1):
        enc = [tok(p + letter, add_special_tokens=False)["input_ids"] for p, letter in
               (example(rng, layout) for _ in range(args.batch_size))]
        n = max(map(len, enc))
        ids = torch.tensor([e + [tok.pad_token_id or 0] * (n - len(e)) for e in enc])
        labels = torch.full_like(ids, -100)
        last = torch.tensor([len(e) - 1 for e in enc])
        rows = torch.arange(len(enc))
        labels[rows, last] = ids[rows, last]
        out = model(input_ids=ids, labels=labels)
        # accuracy of this batch's letters, predicted before the update (a fresh, unseen batch)
        pred = out.logits[rows, last - 1].argmax(-1)
        hits += (pred == ids[rows, last]).sum().item()
        seen += len(enc)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % args.every == 0:
            last_acc = hits / seen
            print(f"  step {step:5d}  loss {out.loss.item():.3f}  accuracy {last_acc:.3f}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            hits = seen = 0
    return last_acc


def main() -> None:
    from vlmforge.text.tokenization import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a vlmforge tokenizer folder (e.g. demo_out/tokenizer)")
    ap.add_argument("--preset", default="small-qwen2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--layouts", default="forward,mmbench", help="comma list of forward, mmbench")
    ap.add_argument("--optimizers", default="adamw", help="comma list of adamw, muon (train.optimizer), side by side")
    ap.add_argument("--muon-lr", type=float, default=0.02, help="train.muon_lr")
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    optimizers = args.optimizers.split(",")
    final = {(layout, o): train_lookup(tok, args, layout, o) for layout in args.layouts.split(",") for o in optimizers}
    print(f"\nletter accuracy over the last {args.every} of {args.steps} steps (chance 0.25):")
    for (layout, o), acc in final.items():
        print(f"  {layout:<8} {o:<6} {acc:.3f}  ({acc / 0.25:.1f}x chance)")
    if set(optimizers) >= {"adamw", "muon"}:
        for layout in args.layouts.split(","):
            print(f"  {layout}: muon / adamw: {final[(layout, 'muon')] / max(final[(layout, 'adamw')], 1e-9):.2f}")


if __name__ == "__main__":
    main()
