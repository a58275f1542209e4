"""Balance of vision and LLM work across data-parallel ranks: the loaders' order vs NeMo's sort vs ours.

Distribution (InternVL3-style SFT with dynamic resolution): per sample 0-4 images (20% text
only), each of a random size (area log-uniform from 256^2 to 2048^2 pixels, aspect
exp(N(0, 0.7)) in [1/8, 8], 2% panoramas or pages at 6-12:1) tiled by
`vlmforge.arch.tiles.tile_counts` (448-pixel tiles, at most 12 per sample, shared among its
images, thumbnail on), 256 tokens per tile; text tokens lognormal (median 250, sigma 1.0) in
[8, 8192]. Samples are packed into sequences of at most 16384 tokens (`plan_packs`, windows of
10,000 samples), the packs shuffled (the loader's seeded order) and cut into optimizer steps of
`--global-batch` packs, `--micro-batch` (1) per rank per micro-step.

    python bench/rank_balance.py                      # 8 and 64 ranks, 128 packs a step, 200 steps
    python bench/rank_balance.py --ranks 8 16 32 --global-batch 256 --steps 100
    python bench/rank_balance.py --unpacked --micro-batch 4   # one sample per row, InternVL's unpacked SFT batch
    python bench/rank_balance.py --packed PACKED --ranks 2 4 --global-batch 16 --steps 20   # a `vlmforge pack` folder

With ``--packed`` the rows are that folder's packs, their loads read from the shard indexes
(``PackedDataset.pack_loads``: image tokens, tokens) in the pretraining loader's seeded epoch
order, and a last row ``loader`` measures the deal the loader itself yields with
``balance_micro_steps`` (``PackedLoader.epoch_plan`` of every rank): it equals ``balanced``; its
ms/step is every rank's loader planning the whole epoch (each rank plans all of it), over the steps.

Prints, for each plan (`vlmforge.data.balance.PLANS`) and rank count, the mean over steps of
max rank / mean rank of the step's vision tokens and LLM tokens (1.00 = every rank has the same
work; the step takes that much longer than a balanced one when ranks meet once per step), the
same for vision tokens when ranks meet at every micro-step (FSDP: sum over micro-steps of the
slowest rank / mean), the worst step, and the planning time per step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vlmforge.arch.tiles import Tiling, tile_counts
from vlmforge.data.balance import PLANS, balanced_plan, lockstep_imbalance, rank_imbalance
from vlmforge.data.packer import plan_packs
from vlmforge.data.pretrain.loader import PackedDataset, PackedLoader

TOKENS_PER_TILE = 256  # InternVL3: 448 px, patch 14 -> 32x32, pixel shuffle 0.5 -> 16x16


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    area = np.exp(rng.uniform(np.log(256**2), np.log(2048**2)))
    if rng.random() < 0.02:
        aspect = rng.uniform(6, 12) ** rng.choice([-1, 1])
    else:
        aspect = float(np.clip(np.exp(rng.normal(0, 0.7)), 1 / 8, 8))
    return max(1, int(round(np.sqrt(area * aspect)))), max(1, int(round(np.sqrt(area / aspect))))


def samples(n: int, rng: np.random.Generator, tiling: Tiling) -> tuple[np.ndarray, np.ndarray]:
    """(vision tokens, total tokens) per sample."""
    n_images = rng.choice([0, 1, 2, 3, 4], size=n, p=[0.2, 0.65, 0.07, 0.04, 0.04])
    text = np.clip(np.round(rng.lognormal(np.log(250), 1.0, n)), 8, 8192).astype(np.int64)
    vision = np.array([TOKENS_PER_TILE * sum(tile_counts([image_size(rng) for _ in range(k)], tiling))
                       for k in n_images], np.int64)
    return vision, vision + text


def rows(n_rows: int, seed: int, max_len: int, window: int, unpacked: bool) -> tuple[np.ndarray, np.ndarray]:
    """(vision tokens, LLM tokens) per row, at least n_rows rows: packs, or single samples when ``unpacked``."""
    rng = np.random.default_rng(seed)
    tiling = Tiling()
    rv, rl = [], []
    while len(rv) < n_rows:
        v, length = samples(window, rng, tiling)
        if unpacked:
            rv += v.tolist()
            rl += length.tolist()
            continue
        for p in plan_packs(length, max_len, seed=seed):
            rv.append(int(v[p].sum()))
            rl.append(int(length[p].sum()))
    return np.array(rv), np.array(rl)


def vision_bound(v: np.ndarray, ranks: int, per_rank: int) -> float:
    """A lower bound on max rank / mean rank of vision tokens for any plan giving each rank
    ``per_rank`` rows of this step: exact for 1 and 2 rows per rank (largest row; the largest
    pair when the largest row is matched with the smallest, and so on), else pigeonhole: some rank
    holds k + 1 of the k * ranks + 1 largest rows."""
    s = np.sort(v)[::-1].astype(np.float64)
    n, mean = s.size, s.sum() / ranks
    if mean == 0:
        return 1.0
    if per_rank == 1:
        return float(s[0] / mean)
    if per_rank == 2:
        return float((s[: n // 2] + s[::-1][: n // 2]).max() / mean)
    best = max(s[k * ranks - k:k * ranks + 1].sum() + np.sort(s[k * ranks + 1:])[:per_rank - k - 1].sum()
               for k in range(per_rank))
    return float(max(best / mean, 1.0))


def loader_plan(ds: PackedDataset, seed: int, steps: int, ranks: int, micro_steps: int, micro_batch: int):
    """The first ``steps`` optimizer steps as the balanced pretraining loader deals them:
    [steps, ranks, micro_steps, micro_batch] pack ids, from every rank's epoch plan."""
    per_rank = [PackedLoader(ds, batch_size=micro_batch, seed=seed, rank=r, world_size=ranks, num_workers=0,
                             balance_micro_steps=micro_steps).epoch_plan(0)[: steps * micro_steps]
                for r in range(ranks)]
    return np.stack([p.reshape(steps, micro_steps, micro_batch) for p in per_rank], axis=1)


def measure(name, vision, llm, order, ranks, micro_steps, micro_batch, ds=None, seed=0):
    t = time.perf_counter()
    if name == "loader":
        plan = loader_plan(ds, seed, order.size // (ranks * micro_steps * micro_batch), ranks, micro_steps, micro_batch)
    else:
        plan = balanced_plan(vision, llm, order, ranks, micro_steps, micro_batch, plan=PLANS[name])
    dt = (time.perf_counter() - t) / plan.shape[0]
    rv = [rank_imbalance(vision, s) for s in plan]
    rl = [rank_imbalance(llm, s) for s in plan]
    lv = [lockstep_imbalance(vision, s) for s in plan]
    return {"vision": np.mean(rv), "llm": np.mean(rl), "lockstep": np.mean(lv), "worst": max(rv), "ms": dt * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--global-batch", type=int, default=128, help="rows (packs) per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=1, help="rows per rank per micro-step")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--window", type=int, default=10_000)
    ap.add_argument("--unpacked", action="store_true", help="one sample per row (length-grouped SFT) instead of packs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packed", metavar="FOLDER", help="a `vlmforge pack` folder instead of the synthetic rows")
    args = ap.parse_args()
    g, mb = args.global_batch, args.micro_batch
    for r in args.ranks:
        if g % (r * mb):
            ap.error(f"--global-batch {g} is not a multiple of {r} ranks x --micro-batch {mb}")
    ds = None
    if args.packed:
        ds = PackedDataset(args.packed)
        vision, llm = ds.pack_loads()
        args.steps = min(args.steps, vision.size // g)
        if args.steps < 1:
            ap.error(f"{args.packed} holds {vision.size} packs, fewer than one step of {g}")
        # the loader's epoch-0 order (one rank, one pack per batch: the seeded permutation itself)
        order = PackedLoader(ds, batch_size=1, seed=args.seed, rank=0, world_size=1).epoch_plan(0).ravel()
        order = order[: args.steps * g]
    else:
        vision, llm = rows(args.steps * g, args.seed, args.max_len, args.window, args.unpacked)
        order = np.random.default_rng([args.seed, 1]).permutation(vision.size)[: args.steps * g]
    v, l_ = vision[order], llm[order]
    what = (f"packs of {args.packed}" if args.packed else
            "samples (unpacked)" if args.unpacked else f"packs of <= {args.max_len} tokens")
    print(f"{vision.size:,} {what}; per row: vision tokens mean {v.mean():.0f} (p5 {np.percentile(v, 5):.0f}, "
          f"p95 {np.percentile(v, 95):.0f}), LLM tokens mean {l_.mean():.0f} (p5 {np.percentile(l_, 5):.0f}, "
          f"p95 {np.percentile(l_, 95):.0f}); {args.steps} steps of {g} rows, {mb} per rank per micro-step")
    print("mean over steps of max rank / mean rank (1.00 = balanced); lockstep: vision, ranks meeting at every "
          "micro-step; worst: the worst step's vision")
    print(f"{'':<14}" + "".join(f"{f'{r} ranks x {g // (r * mb)} micro-steps':>40}" for r in args.ranks))
    print(f"{'plan':<14}" + "".join(f"{'vision':>9}{'LLM':>7}{'lockstep':>9}{'worst':>7}{'ms/step':>8}"
                                    for _ in args.ranks))
    for name in list(PLANS) + (["loader"] if ds is not None else []):
        row = ""
        for r in args.ranks:
            m = measure(name, vision, llm, order, r, g // (r * mb), mb, ds, args.seed)
            row += f"{m['vision']:>9.3f}{m['llm']:>7.3f}{m['lockstep']:>9.3f}{m['worst']:>7.3f}{m['ms']:>8.2f}"
        print(f"{name:<14}{row}")
    row = ""
    for r in args.ranks:
        b = [vision_bound(v[s * g:(s + 1) * g], r, g // r) for s in range(args.steps)]
        row += f"{np.mean(b):>9.3f}{'':>7}{'':>9}{max(b):>7.3f}{'':>8}"
    print(f"{'lower bound':<14}{row}")


if __name__ == "__main__":
    main()
