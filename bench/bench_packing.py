"""Packing quality and speed: our packer vs plain first-fit-decreasing, and packed vs padded batches.

Distribution (Open-Qwen2VL pretraining captions): each sample = 144 visual tokens + caption tokens
drawn lognormal (median 20, sigma 0.6) clipped to [5, 300] + 1 separator; windows of 10,000
samples are planned independently (one output shard each); max_len 4096.

    python bench/bench_packing.py                 # 1,000,000 samples = 100 windows
    python bench/bench_packing.py --samples 100000
    python bench/bench_packing.py --pack-stage 50000   # also run `vlmforge pack` end to end

Prints, measured side by side in this run: packs, lower bound, mean/min fill and planning time
of ours vs FFD per window and in total; then the token efficiency (real tokens / tokens computed)
of packed rows vs padded batches of the same samples.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vlmforge.data.packer import first_fit_decreasing, lower_bound, plan_packs


def caption_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    caption = np.clip(np.round(rng.lognormal(np.log(20), 0.6, n)), 5, 300).astype(np.int64)
    return 144 + caption + 1


def run_packer(name, fn, lengths, window, max_len):
    packs_total, times, fills, mins = 0, [], [], []
    for w in range(0, lengths.size, window):
        L = lengths[w : w + window]
        t = time.perf_counter()
        packs = fn(L, max_len)
        times.append(time.perf_counter() - t)
        used = np.array([L[p].sum() for p in packs])
        assert np.array_equal(np.sort(np.concatenate(packs)), np.arange(L.size)) and used.max() <= max_len
        packs_total += len(packs)
        fills.append(L.sum() / (len(packs) * max_len))
        mins.append(used.min() / max_len)
    return {
        "name": name,
        "packs": packs_total,
        "mean_fill": lengths.sum() / (packs_total * max_len),
        "worst_window_fill": min(fills),
        "min_pack_fill": min(mins),
        "s_per_window": float(np.mean(times)),
        "max_s_per_window": float(np.max(times)),
        "total_s": float(np.sum(times)),
    }


def padded_efficiency(lengths: np.ndarray, batch: int, sort_groups: int = 0, seed: int = 0) -> float:
    """Real tokens / (rows x longest row) for batches of `batch` samples in random order
    (or sorted by length within mega-batches of `sort_groups` batches: length grouping)."""
    order = np.random.default_rng(seed).permutation(lengths.size)
    L = lengths[order]
    if sort_groups:
        g = batch * sort_groups
        L = np.concatenate([np.sort(L[i : i + g]) for i in range(0, L.size, g)])
    computed = sum(len(L[i : i + batch]) * L[i : i + batch].max() for i in range(0, L.size, batch))
    return float(L.sum() / computed)


def pack_stage(n: int, seed: int = 0) -> None:
    """The whole pack stage on n caption samples (tiny PNGs, lognormal word counts), Open-Qwen2VL
    geometry (144 visual tokens, 4096): throughput and the manifest's fill, carry-over included."""
    import io
    import tempfile
    from pathlib import Path

    from PIL import Image

    from vlmforge.config import load_recipe
    from vlmforge.data.pretrain.plan import pack_shards
    from vlmforge.shards import ShardWriter
    from vlmforge.text.tokenization import train_tokenizer

    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(200)]
    counts = np.clip(np.round(rng.lognormal(np.log(10), 0.6, n)), 3, 150).astype(int)
    caps = [" ".join(rng.choice(words, c)) for c in counts]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 200)).save(buf, "PNG")
    img = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_tokenizer(caps[:2000], work / "tok", vocab_size=300, min_frequency=1)
        with ShardWriter(work / "shards", samples_per_shard=10_000, timestamps=False) as w:
            for cap in caps:
                w.write(w.next_key(), img, cap, {})
        # geometry from the shipped preset (no hub access needed)
        cfg = load_recipe("open_qwen2vl/pretrain", ["pack.window=10000", "model.vision.pretrained=null"])
        t = time.perf_counter()
        m = pack_shards(cfg, [str(work / "shards")], work / "packed", str(work / "tok"), progress=False)
        dt = time.perf_counter() - t
    f, h = m["fill"], m["length_histogram"]
    print(f"\npack stage (`vlmforge pack`, open_qwen2vl/pretrain geometry): {n:,} samples in {dt:.1f} s "
          f"({n / dt:,.0f} samples/s incl. image check + tokenize + write); mean sample {h['mean']:.1f} tokens; "
          f"{m['counts']['packs']} packs, mean fill {f['mean_fill']:.4f} (lower bound {f['lower_bound_fill']:.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=10_000)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pack-stage", type=int, default=0, metavar="N", help="also run the pack stage on N samples")
    args = ap.parse_args()
    lengths = caption_lengths(args.samples, args.seed)
    nwin = -(-args.samples // args.window)
    lb = sum(lower_bound(lengths[w : w + args.window], args.max_len) for w in range(0, lengths.size, args.window))
    print(f"{args.samples:,} samples, {nwin} windows of {args.window:,}, max_len {args.max_len}, "
          f"mean sample {lengths.mean():.1f} tokens; lower bound {lb} packs "
          f"(fill {lengths.sum() / (lb * args.max_len):.4f})")
    rows = [
        run_packer("ours (plan_packs)", lambda L, m: plan_packs(L, m, seed=args.seed), lengths, args.window, args.max_len),
        run_packer("plain FFD", first_fit_decreasing, lengths, args.window, args.max_len),
    ]
    hdr = f"{'packer':<20}{'packs':>9}{'mean fill':>11}{'worst win':>11}{'min pack':>10}{'s/window':>10}{'max s/win':>10}{'total s':>9}"
    print(hdr)
    for r in rows:
        print(f"{r['name']:<20}{r['packs']:>9}{r['mean_fill']:>11.4f}{r['worst_window_fill']:>11.4f}"
              f"{r['min_pack_fill']:>10.3f}{r['s_per_window']:>10.3f}{r['max_s_per_window']:>10.3f}{r['total_s']:>9.1f}")
    ours, ffd = rows
    print(f"ours vs FFD: {ffd['packs'] - ours['packs']} fewer packs ({(ffd['packs'] / ours['packs'] - 1) * 100:.2f}% less "
          f"compute), {ffd['total_s'] / ours['total_s']:.1f}x faster")

    print("\ntoken efficiency (real tokens / tokens computed), same samples:")
    sub = lengths[: min(lengths.size, 200_000)]
    packed = ours["mean_fill"]
    for name, eff in [
        ("packed, ours (4096/row)", packed),
        ("packed, plain FFD", ffd["mean_fill"]),
        ("padded, batch 32, random", padded_efficiency(sub, 32)),
        ("padded, batch 32, length-grouped", padded_efficiency(sub, 32, sort_groups=50)),
        ("padded to 4096 (one per row)", float(sub.mean() / args.max_len)),
    ]:
        print(f"  {name:<36}{eff:>8.4f}   ({packed / eff:5.2f}x fewer tokens with ours)")
    if args.pack_stage:
        pack_stage(args.pack_stage, args.seed)


if __name__ == "__main__":
    main()
