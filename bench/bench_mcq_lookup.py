"""Can the demo's language model learn to answer multiple choice with a letter? (demo diagnosis)

Text only, the answer stated in the prompt itself:

    The star is red. What color is the star?
    A. blue / B. red / C. green / D. yellow   (one option per line, MMBench-style suffix)
    -> "B"

The LM preset is trained from random weights on fresh batches of such prompts (loss on the
letter only) and its letter accuracy is printed as it trains, next to chance (0.25). This isolates
the option-lookup skill (find the option that matches, copy its letter) from seeing.

    python bench/bench_mcq_lookup.py --tokenizer demo_out/tokenizer [--preset small-qwen2]

Measured on this 2-core CPU (accuracy per 200 steps, chance 0.25):
- small-qwen2 (128 wide, 4 layers, 4 heads), lr 2e-3: 0.241-0.259 through step 1200 (235 s),
  and 0.245-0.255 per 500 steps through step 4000 (826 s, `--steps 4000 --every 500`);
  an equivalent earlier run with lr 6e-3: chance through step 800;
- 8 heads instead of 4: 0.242-0.257 through step 600 (158 s);
- 256 wide, 8 heads: 0.238-0.256 through step 600 (427 s).
The demo's whole SFT stage is ~700 steps, so its MCQ score sits at chance however well it sees.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]
SUFFIX = "Answer with the option's letter from the given choices directly."


def example(rng: random.Random) -> tuple[str, str]:
    shape, color = rng.choice(SHAPES), rng.choice(COLORS)
    options = COLORS[:]
    rng.shuffle(options)
    lines = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
    return f"The {shape} is {color}. What color is the {shape}?\n{lines}\n{SUFFIX}\n", "ABCD"[options.index(color)]


def main() -> None:
    from vlmforge.config import load_recipe
    from vlmforge.data.tokenizer import load_tokenizer
    from vlmforge.model.build import build_llm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a vlmforge tokenizer folder (e.g. demo_out/tokenizer)")
    ap.add_argument("--preset", default="small-qwen2")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--every", type=int, default=100)
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    model = build_llm(load_recipe(None, [f"model.llm.preset={args.preset}"]).model, vocab_size=len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng, t0, hits, seen = random.Random(0), time.perf_counter(), 0, 0
    print(f"{args.preset}, batch {args.batch_size}, lr {args.lr}: letter accuracy (chance 0.25)")
    for step in range(1, args.steps + 1):
        enc = [tok(p + letter, add_special_tokens=False)["input_ids"] for p, letter in
               (example(rng) for _ in range(args.batch_size))]
        n = max(map(len, enc))
        ids = torch.tensor([e + [tok.pad_token_id or 0] * (n - len(e)) for e in enc])
        labels = torch.full_like(ids, -100)
        last = torch.tensor([len(e) - 1 for e in enc])
        labels[torch.arange(len(enc)), last] = ids[torch.arange(len(enc)), last]
        out = model(input_ids=ids, labels=labels)
        # accuracy of this batch's letters, predicted before the update (a fresh, unseen batch)
        pred = out.logits[torch.arange(len(enc)), last - 1].argmax(-1)
        hits += (pred == ids[torch.arange(len(enc)), last]).sum().item()
        seen += len(enc)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % args.every == 0:
            print(f"  step {step:5d}  loss {out.loss.item():.3f}  accuracy {hits / seen:.3f}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            hits = seen = 0


if __name__ == "__main__":
    main()
