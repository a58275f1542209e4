"""Training-step time on CPU with and without ``train.compile`` (torch.compile per decoder layer,
placed by vlmforge.train.parallel.place_model), side by side in one process.

One step = forward (output="target_logprobs" on every supervised position) + backward + AdamW on
packed rows of random tokens with images. Each variant and repeat runs in its own fresh process
(variants alternating) with the same seed, so neither can slow the other; the first ``--warmup``
steps (which include compiling; inductor's disk cache makes later processes faster) are timed
apart and not counted; the median (and the best) of the rest is printed per run, then the median
over repeats and the best step overall (on a shared machine the best step is the steadier figure).

    python bench/compile_step.py                          # small-qwen2 LM, 4 rows x 256 tokens
    python bench/compile_step.py --ac --steps 10          # with activation checkpointing
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def make_batch(model, rows: int, length: int, images_per_row: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = model.llm.get_input_embeddings().num_embeddings
    t = model.tokens_per_image
    ids = torch.randint(5, vocab - 2, (rows, length), generator=g)
    ids[ids == model.image_token_id] = 5
    docs = 4  # equal documents per row, the first ``images_per_row`` of them start with an image
    doc_len = length // docs
    seq = (torch.arange(length) // doc_len).clamp(max=docs - 1).expand(rows, length).clone()
    positions = torch.arange(length) - seq[0] * doc_len
    positions = positions.expand(rows, length).clone()
    for k in range(images_per_row):
        ids[:, (k % docs) * doc_len:(k % docs) * doc_len + t] = model.image_token_id
    flat = torch.arange(rows * length).view(rows, length)[:, :-1].flatten()
    nxt = ids[:, 1:].flatten()
    keep = nxt != model.image_token_id
    size = model.image_size
    return {
        "input_ids": ids, "seq_ids": seq, "position_ids": positions,
        "pixel_values": torch.randn(rows * images_per_row, 3, size, size, generator=g),
        "pred_index": flat[keep], "target_ids": nxt[keep],
    }


def run_variant(args, compile_layers: bool) -> tuple[float, float, float, list[float]]:
    from vlmforge.config import load_recipe
    from vlmforge.model.build import build_vlm
    from vlmforge.train.parallel import place_model

    overrides = [f"model.llm.preset={args.preset}", "model.projector.pool_size=2",
                 f"train.compile={str(compile_layers).lower()}",
                 f"train.activation_checkpointing={str(args.ac).lower()}"]
    cfg = load_recipe(None, overrides)
    model = build_vlm(cfg.model, seed=0)
    model, _ = place_model(model, cfg.train, torch.device("cpu"), world_size=1)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(model, args.rows, args.length, args.images)
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = -model(**batch, output="target_logprobs").mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    warm = sum(times[: args.warmup])
    return statistics.median(times[args.warmup:]), min(times[args.warmup:]), warm, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-qwen2", help="model.llm.preset")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--images", type=int, default=2, help="images per row")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing on")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--worker", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        med, best, warm, losses = run_variant(args, args.worker == "compiled")
        print(json.dumps({"median": med, "best": best, "warm": warm, "losses": losses}))
        return
    print(f"LM {args.preset}, {args.rows} rows x {args.length} tokens, {args.images} images per row, "
          f"activation checkpointing {'on' if args.ac else 'off'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    medians, bests = {False: [], True: []}, {False: [], True: []}
    for rep in range(args.repeats):
        for compiled in (False, True):
            name = "compiled" if compiled else "eager"
            cmd = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            medians[compiled].append(r["median"])
            bests[compiled].append(r["best"])
            print(f"repeat {rep}: {name:<8} median step {r['median'] * 1e3:8.1f} ms, best {r['best'] * 1e3:8.1f} ms  (first {args.warmup} steps "
                  f"{r['warm']:6.1f} s; loss {r['losses'][0]:.5f} -> {r['losses'][-1]:.5f})", flush=True)
    eager, compiled = statistics.median(medians[False]), statistics.median(medians[True])
    print(f"eager {eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms per step: compiled / eager = "
          f"{compiled / eager:.3f} (speed-up {eager / compiled:.3f}x); best steps: eager {min(bests[False]) * 1e3:.1f} ms, "
          f"compiled {min(bests[True]) * 1e3:.1f} ms, ratio {min(bests[True]) / min(bests[False]):.3f}")


if __name__ == "__main__":
    main()
