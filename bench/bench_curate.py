"""``curate score`` throughput vs the bare model forward on the same batches, side by side.

Builds caption shards of synthetic JPEGs (default 256x192, photo-like) unless ``--in`` is given,
then measures side by side, each repeat running every row once (the order rotates):

  bare forward   the model's own forward (image + text towers, logits) on batches that are
                 already preprocessed tensors: the ceiling for scoring, at the torch threads the
                 scoring main process uses next to N readers (``curate.score.model_threads``)
  score w=N      ``vlmforge curate score`` end to end: read tar, decode, preprocess (N DataLoader
                 reader workers; 0 = in the main process), forward, cosine, write parquet sidecars

"vs bare" compares with the bare forward at the same thread count. CPU time per image of the main
process and of the readers is printed too (on a machine whose cores are shared, wall-clock rates
measure the neighbours as well).

The model is a random CLIP: ``--size tiny`` (the filter-network architecture, 64 px) or
``--size base`` (ViT-B/32 geometry, 224 px), unless ``--model DIR`` names a CLIP/SigLIP folder.

    python bench/bench_curate.py --images 512 --batch-size 64 --workers 0,1,2 --repeats 3
    python bench/bench_curate.py --images 256 --size base
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from _common import synthetic_jpeg


def make_shards(out: Path, n: int, per_shard: int, w: int, h: int) -> None:
    from vlmforge.shards import ShardWriter

    rng = random.Random(0)
    words = "a the red blue green small large dog cat tree house car person street sky water".split()
    with ShardWriter(out, samples_per_shard=per_shard) as sw:
        for i in range(n):
            cap = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
            sw.write(sw.next_key(), synthetic_jpeg(i, w, h), cap, {"uid": f"{i:032x}"})


def random_model(out: Path, size: str) -> Path:
    from vlmforge.config.curate import TrainFilterConfig
    from vlmforge.curate.train_filter import add_eos_postprocessor, build_image_processor, build_model
    from vlmforge.text.tokenization import load_tokenizer, train_tokenizer

    words = "a the red blue green small large dog cat tree house car person street sky water".split()
    rng = random.Random(0)
    train_tokenizer([" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)], out / "tok", vocab_size=300)
    tok = load_tokenizer(out / "tok")
    add_eos_postprocessor(tok)
    tf = TrainFilterConfig()
    if size == "base":  # CLIP ViT-B/32 geometry (random weights): a realistic forward cost
        tf = TrainFilterConfig(image_size=224, patch_size=32, hidden_size=768, num_layers=12, num_heads=12,
                               embed_dim=512, max_text_len=77)
    model = build_model(tf, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    build_image_processor(tf.arch, tf.image_size).save_pretrained(out)
    return out


def cpu_seconds() -> tuple[float, float]:
    """CPU time of this process, and of its children that have exited (the reader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def timed(fn, n: int) -> tuple[float, float, float]:
    """(images/s, CPU s per image here, in exited children) of ``fn()`` over ``n`` images."""
    t, (own, kids) = time.perf_counter(), cpu_seconds()
    fn()
    wall = time.perf_counter() - t
    own2, kids2 = cpu_seconds()
    return n / wall, (own2 - own) / n, (kids2 - kids) / n


def main() -> None:
    import torch

    from vlmforge.config.curate import ScoreConfig
    from vlmforge.curate.score import model_threads, score_shards
    from vlmforge.curate.scorers import load_scorer
    from vlmforge.imagedecode import decode_image
    from vlmforge.shards import iter_raw_samples, list_shards

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in", dest="inputs", default=None, help="existing shards (default: synthesise)")
    ap.add_argument("--model", default=None, help="CLIP/SigLIP folder (default: a random CLIP of --size)")
    ap.add_argument("--size", dest="model_size", choices=["tiny", "base"], default="tiny",
                    help="random model: tiny (filter network, 64 px) or base (ViT-B/32 geometry, 224 px)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--image-size", default="256x192", help="synthetic JPEG size WxH")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated reader worker counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_curate_"))
    if args.inputs is None:
        w, h = (int(v) for v in args.image_size.split("x"))
        make_shards(tmp / "shards", args.images, max(1, args.images // 4), w, h)
        shards = list_shards(tmp / "shards")
    else:
        shards = list_shards(args.inputs)
    model_dir = args.model or str(random_model(tmp / "model", args.model_size))
    scorer = load_scorer("clip", ScoreConfig(model=model_dir, device=args.device))
    dev = scorer.device

    # bare: preprocess everything first, then time only the model's forward
    images, caps = [], []
    for t in shards:
        for s in iter_raw_samples(t):
            if s.error is None:
                images.append(decode_image(s.image_bytes))
                caps.append(s.caption or "")
    batches = [scorer.prepare(images[i : i + args.batch_size], caps[i : i + args.batch_size])
               for i in range(0, len(images), args.batch_size)]
    n = len(images)
    scorer.bare_forward(batches[0])  # warm-up
    workers = [int(w) for w in args.workers.split(",")]

    def bare():
        for b in batches:
            scorer.bare_forward(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def score(w):
        out = tmp / f"scores_w{w}_{time.perf_counter_ns()}"
        score_shards(shards, out, scorer, batch_size=args.batch_size, num_workers=w)

    rows = []
    for w in workers:
        with model_threads(dev, w):
            threads = torch.get_num_threads()
        if not any(r[0] == f"bare forward, {threads} threads" for r in rows):
            rows.append((f"bare forward, {threads} threads", 0, threads))
        rows.append((f"curate score, {w} reader workers", w, threads))
    results: dict[str, list] = {r[0]: [] for r in rows}
    for rep in range(args.repeats):
        k = rep % len(rows)
        for name, w, threads in rows[k:] + rows[:k]:
            if name.startswith("bare"):
                before = torch.get_num_threads()
                torch.set_num_threads(threads)
                results[name].append(timed(bare, n))
                torch.set_num_threads(before)
            else:
                results[name].append(timed(lambda w=w: score(w), n))

    print(f"\n{n} images in {len(shards)} shards, batch {args.batch_size}, device {dev}, model "
          f"{scorer.info()['model_class']} ({args.model_size + ' random' if args.model is None else args.model}); "
          f"{args.repeats} repeats, medians")
    print(f"{'':36}{'images/s':>9}{'vs bare':>8}{'CPU ms/img main/readers':>25}   each repeat: images/s")
    med = {name: [statistics.median(col) for col in zip(*runs)] for name, runs in results.items()}
    for name, _, threads in rows:
        rate, own, kids = med[name]
        bare_rate = med[f"bare forward, {threads} threads"][0]
        each = " ".join(f"{r:.0f}" for r, _, _ in results[name])
        print(f"{name:36}{rate:9.1f}{rate / bare_rate:8.2f}{f'{own * 1000:.2f} / {kids * 1000:.2f}':>25}   {each}")


if __name__ == "__main__":
    main()
