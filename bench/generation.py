"""Sampling N replies per prompt (Best-of-N, preference replies, rollouts) with the demo's LM shape,
side by side: each prompt's N rows prefilled once and their cache shared (``decoding.generate``
when the N copies carry the same image objects) vs every row prefilled (copies of the images),
each at 1 and 2 torch threads.

The model is the demo's geometry with random weights (small-qwen2 LM: 4 layers x 128; the
tiny-clip tower at 72 px pooled to 3x3: 9 visual tokens); prompts are chat turns of ``--words``
words with one image. Sampling is seeded per row; a random model rarely samples its stop token,
so nearly every row runs the full ``--new`` tokens. Every variant and repeat runs in its
own fresh process, variants alternating; the median over repeats of rows per second is printed,
then the ratios. The replies of the shared and the unshared runs are compared (equal: the
sharing changes nothing but the cost).

    python bench/generation.py                          # 32 prompts x 8 replies, 48 new tokens
    python bench/generation.py --prompts 8 --samples 8 --new 4     # short answers (preference build)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = "what colour shape is the left right top bottom circle square triangle star red blue green how many".split()


def run_variant(args, shared: bool) -> dict:
    from PIL import Image

    from vlmforge.config import load_recipe
    from vlmforge.model.build import build_vlm
    from vlmforge.model.decoding import generate
    from vlmforge.text.tokenization import load_tokenizer, train_tokenizer

    tok_dir = Path(args.work) / "tok"
    if not tok_dir.exists():
        train_tokenizer([" ".join(WORDS)] * 50, tok_dir, vocab_size=300, min_frequency=1)
    tok = load_tokenizer(tok_dir)
    cfg = load_recipe(None, ["model.llm.preset=small-qwen2", "model.vision.preset=tiny-clip",
                             "model.vision.image_size=72", "model.projector.pool_size=3"])
    model = build_vlm(cfg.model, tok, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts, images = [], []
    for _ in range(args.prompts):
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (args.words,), generator=g)]
        prompts.append([{"role": "user", "content": "<image>\n" + " ".join(words) + "?"}])
        images.append([Image.new("RGB", (72, 72), tuple(int(v) for v in torch.randint(256, (3,), generator=g)))])
    rows_p = [p for p in prompts for _ in range(args.samples)]
    rows_i = [ims if shared else [im.copy() for im in ims] for ims in images for _ in range(args.samples)]
    seeds = list(range(len(rows_p)))
    t0 = time.perf_counter()
    out = generate(model, tok, rows_p, rows_i, max_new_tokens=args.new, temperature=1.0, seed=seeds, return_ids=True)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(json.dumps(out).encode()).hexdigest()[:16]
    return {"seconds": seconds, "rows": len(rows_p), "new_tokens": sum(len(o) for o in out), "digest": digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8, help="replies per prompt")
    ap.add_argument("--new", type=int, default=48, help="new tokens per reply")
    ap.add_argument("--words", type=int, default=24, help="words per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=["shared", "copies"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_variant(args, args.worker == "shared")))
        return
    print(f"{args.prompts} prompts x {args.samples} replies, {args.new} new tokens, ~{args.words} words + 9 visual "
          f"tokens per prompt; small-qwen2 (random weights), torch {torch.__version__}")
    variants = [(w, t) for t in (1, 2) for w in ("shared", "copies")]
    rates: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    digests: dict[str, set[str]] = {"shared": set(), "copies": set()}
    with tempfile.TemporaryDirectory() as work:
        for rep in range(args.repeats):
            for worker, threads in variants:
                cmd = [sys.executable, __file__, "--worker", worker, "--threads", str(threads), "--work", work,
                       *sys.argv[1:]]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{worker} run failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rates[(worker, threads)].append(r["rows"] / r["seconds"])
                digests[worker].add(r["digest"] + f"@{threads}")
                print(f"repeat {rep}: {worker:<7} {threads} thread(s): {r['seconds']:6.2f} s, {r['rows'] / r['seconds']:7.1f} rows/s, "
                      f"{r['new_tokens']} new tokens, replies {r['digest']}", flush=True)
    med = {v: statistics.median(x) for v, x in rates.items()}
    for threads in (1, 2):
        print(f"{threads} thread(s): shared prefill {med[('shared', threads)]:.1f} rows/s, every row prefilled "
              f"{med[('copies', threads)]:.1f}: ratio {med[('shared', threads)] / med[('copies', threads)]:.2f}")
    print(f"shared prefill, 1 thread / 2 threads: {med[('shared', 1)] / med[('shared', 2)]:.2f}; "
          f"replies equal shared vs copies (per thread count): {digests['shared'] == digests['copies']}")


if __name__ == "__main__":
    main()
