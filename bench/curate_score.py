"""``curate score`` (tiny CLIP) vs the bare model forward on pre-decoded tensors, by pixel path and workers.

Builds caption shards of synthetic JPEGs (default 256x192, photo-like) and a random CLIP (the
filter-network architecture, 64 px; ``--size base``: ViT-B/32 geometry, 224 px), then measures side
by side, each repeat running every row once (the order rotates per repeat):

  bare forward      the model's own forward (image + text towers, logits) on batches prepared
                    beforehand (decoded, preprocessed, tokenised): the ceiling, at the torch threads
                    the scoring main process uses next to N readers
  PATH w=N          ``curate score`` end to end (read tar, decode, preprocess, tokenise in N reader
                    workers, 0 = the main process; forward, cosine, parquet sidecars), PATH one of
                    processor  transformers' image processor in the readers (the path before)
                    exact      vlmforge's reproduction of its steps (bit-identical pixels; default)
                    draft      exact + JPEG draft decoding (opt-in; other pixels)

"vs bare" = images/s over the bare forward's at the same thread count, repeat by repeat (median
[min-max]). CPU ms per image of the main process (m) and of all readers together (r, exited
children) are printed too, since on a machine whose cores are shared the wall-clock rates measure
the neighbours as well; from them, with b the bare forward's CPU ms per image, the ratio the row
would reach with a free core per process, b / max(m, r / N), and on ``--cores`` free cores,
b / max(m, r / N, (m + r) / cores). The scores of every path are compared with the processor's.

    OMP_NUM_THREADS=1 python bench/curate_score.py --images 2048 --repeats 3
    OMP_NUM_THREADS=1 python bench/curate_score.py --paths processor,exact,draft --workers 1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_curate import make_shards, random_model, timed

PATHS = {"processor": {"pixels": "processor"}, "exact": {}, "draft": {"draft": True}}


def main() -> None:
    import pyarrow.parquet as pq
    import torch

    from vlmforge.curate.score import model_threads, score_shards
    from vlmforge.curate.scorers.clip import ContrastiveScorer
    from vlmforge.imagedecode import decode_image
    from vlmforge.shards import iter_raw_samples, list_shards

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--image-size", default="256x192", help="synthetic JPEG size WxH")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated reader worker counts")
    ap.add_argument("--paths", default="exact,draft", help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="for the CPU-bound ratio column")
    ap.add_argument("--workdir", default=None, help="keep shards, model and sidecars here (default: temp)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    if not (work / "model" / "config.json").exists():
        w, h = (int(v) for v in args.image_size.split("x"))
        make_shards(work / "shards", args.images, max(1, args.images // 4), w, h)
        random_model(work / "model", args.size)
    shards = list_shards(work / "shards")
    paths = args.paths.split(",")
    scorers = {p: ContrastiveScorer(str(work / "model"), device="cpu", **PATHS[p]) for p in paths}
    base = ContrastiveScorer(str(work / "model"), device="cpu", pixels="processor")

    images, caps = [], []
    for t in shards:
        for s in iter_raw_samples(t):
            if s.error is None:
                images.append(decode_image(s.image_bytes))
                caps.append(s.caption or "")
    n, bs = len(images), args.batch_size
    batches = [base.prepare(images[i : i + bs], caps[i : i + bs]) for i in range(0, n, bs)]
    base.bare_forward(batches[0])  # warm-up

    def bare():
        for b in batches:
            base.bare_forward(b)

    runs: dict[str, Path] = {}

    def score(path: str, w: int):
        out = work / f"scores_{path}_w{w}_{time.perf_counter_ns()}"
        score_shards(shards, out, scorers[path], batch_size=bs, num_workers=w)
        runs.setdefault(path, out)

    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    for w in workers:
        with model_threads(torch.device("cpu"), w):
            threads = torch.get_num_threads()
        if not any(r[0] == f"bare forward, {threads} thr" for r in rows):
            rows.append((f"bare forward, {threads} thr", None, 0, threads))
        rows += [(f"{p} w={w}", p, w, threads) for p in paths]
    results: dict[str, list] = {r[0]: [] for r in rows}
    for rep in range(args.repeats):
        k = rep % len(rows)
        for name, path, w, threads in rows[k:] + rows[:k]:
            if path is None:
                before = torch.get_num_threads()
                torch.set_num_threads(threads)
                results[name].append(timed(bare, n))
                torch.set_num_threads(before)
            else:
                results[name].append(timed(lambda p=path, w=w: score(p, w), n))

    print(f"\n{n} images {args.image_size} in {len(shards)} shards, batch {bs}, {args.size} random CLIP; "
          f"{args.repeats} repeats: median [min-max]")
    print(f"{'':22}{'images/s':>9}{'vs bare':>20}{'CPU ms/img m / r':>18}"
          f"{'CPU-bound ratio: free cores / ' + str(args.cores) + ' cores':>40}")
    for name, _, w, threads in rows:
        rates = [r for r, _, _ in results[name]]
        bare_runs = results[f"bare forward, {threads} thr"]
        ratios = [r / b[0] for r, b in zip(rates, bare_runs)]  # repeat by repeat: same neighbours
        m = statistics.median(o for _, o, _ in results[name]) * 1000
        r = statistics.median(c for _, _, c in results[name]) * 1000
        b = statistics.median(o for _, o, _ in bare_runs) * 1000
        free = b / max(m, r / w) if w else b / (m + r)
        cores = b / max(m, r / w, (m + r) / args.cores) if w else free
        ratio = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
        print(f"{name:22}{statistics.median(rates):9.1f}{ratio:>20}{f'{m:.2f} / {r:.2f}':>18}"
              f"{f'{free:.2f} / {cores:.2f}':>40}")

    if "processor" in runs:
        ref = runs["processor"]
    else:  # the processor's scores, once, for the comparison
        ref = work / f"scores_processor_ref_{time.perf_counter_ns()}"
        score_shards(shards, ref, base, batch_size=bs, num_workers=0)
    base_scores = np.concatenate([pq.read_table(f).column("score").to_numpy() for f in sorted(ref.glob("*.parquet"))])
    for path, out in runs.items():
        got = np.concatenate([pq.read_table(f).column("score").to_numpy() for f in sorted(out.glob("*.parquet"))])
        d = np.abs(got - base_scores)
        rank = np.corrcoef(np.argsort(np.argsort(got)), np.argsort(np.argsort(base_scores)))[0, 1]
        print(f"scores {path} vs processor: max |diff| {d.max():.3g}, mean {d.mean():.3g}, identical "
              f"{np.mean(got == base_scores):.1%}, rank correlation {rank:.5f} (score std {base_scores.std():.3g})")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
