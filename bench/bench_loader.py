"""Packed and SFT loader throughput vs the bare JPEG decode + resize + normalise, with 0, 1, 2 workers.

Builds caption shards of synthetic JPEGs (default 512x384, photo-like: smooth gradients + noise),
packs them for the Open-Qwen2VL pretraining geometry (SigLIP-so400m 384 px, 12x12 pooled = 144
visual tokens, max_len 4096, micro-batch 1 pack), and indexes the same JPEGs as one-turn LLaVA
conversations for SFT (length-grouped rows, micro-batch 4). Then measures side by side, each
repeat running every row once (the order rotates per repeat):

  bare            decode_image + resize + rescale/normalise into a float tensor, one process: the
                  work a loader cannot avoid, per image
  bare x2         the same split over 2 processes: what 2 cores give right now (shared machine)
  packed w=N      PackedLoader over the packed shards (read, decode, preprocess, collate; N workers)
  sft w=N         SFTLoader over the index (tokenise, read, decode, preprocess, collate; N workers)

Ratios: "vs bare" = images/s over bare's; "per worker" = over N x bare (N >= 1). Medians over
repeats, and each repeat's value, are printed. On a machine whose cores are shared, wall-clock
rates with workers measure the neighbours as much as the loader, so the CPU time per image of
every process involved is printed too (main / workers, ms per image): "worker eff." = bare's CPU
time per image / a worker's (the throughput per worker when every process has a core of its own),
"CPU eff." = bare's / the row's total (main + workers).

    python bench/bench_loader.py --images 512 --repeats 3
    python bench/bench_loader.py --workers 0,1,2 --only packed
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import synthetic_jpeg

MODEL = ["model.vision.preset=siglip-so400m-patch14-384", "model.projector.pool_size=12"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "a the red blue green small large dog cat tree house car person street sky water field at on in near with".split()
    return [" ".join(rng.choice(words) for _ in range(max(5, int(rng.lognormvariate(np.log(16), 0.6))))) for _ in range(n)]


def _bare(images: list[bytes], spec: dict) -> int:
    from vlmforge.images import load_pixel_values

    for b in images:
        load_pixel_values(b, spec)
    return len(images)


def cpu_seconds() -> tuple[float, float]:
    """CPU time of this process, and of its children that have exited (DataLoader workers, pool)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float, float]:
    """(images/s, CPU seconds per image in this process, in its children) of ``fn() -> images``."""
    t, (own, kids) = time.perf_counter(), cpu_seconds()
    n = fn()
    wall = time.perf_counter() - t
    own2, kids2 = cpu_seconds()
    return n / wall, (own2 - own) / n, (kids2 - kids) / n


def bare_rate(images: list[bytes], spec: dict, processes: int) -> tuple[float, float, float]:
    if processes <= 1:
        return timed(lambda: _bare(images, spec))
    parts = [images[i::processes] for i in range(processes)]

    def run() -> int:
        with mp.get_context("fork").Pool(processes) as pool:
            return sum(pool.starmap(_bare, [(p, spec) for p in parts]))
    return timed(run)


def loader_rate(make, workers: int) -> tuple[float, float, float]:
    loader = make(workers)
    return timed(lambda: sum(int(b["pixel_values"].shape[0]) for b in loader))


def build(work: Path, n: int, width: int, height: int):
    from vlmforge.config import load_recipe
    from vlmforge.data.pretrain.plan import pack_shards
    from vlmforge.data.sft.build import build_index
    from vlmforge.shards import ShardWriter
    from vlmforge.text.tokenization import train_tokenizer

    caps = captions(n)
    images = [synthetic_jpeg(i, width, height) for i in range(n)]
    train_tokenizer(caps + ["What is in the picture?"], work / "tok", vocab_size=300, min_frequency=1)
    with ShardWriter(work / "shards", samples_per_shard=256, timestamps=False) as w:
        for img, cap in zip(images, caps):
            w.write(w.next_key(), img, cap, {})
    (work / "sft_images").mkdir()
    records = []
    for i, (img, cap) in enumerate(zip(images, caps)):
        (work / "sft_images" / f"{i:06d}.jpg").write_bytes(img)
        records.append({"image": f"{i:06d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": cap}]})
    (work / "sft.json").write_text(json.dumps(records))
    cfg = load_recipe(None, MODEL + ["pack.max_len=4096", "pack.window=10000", f"train.data_path={work / 'packed'}",
                                     "train.micro_batch_size=1"])
    manifest = pack_shards(cfg, [str(work / "shards")], work / "packed", str(work / "tok"), progress=False)
    from vlmforge.arch.geometry import visual_tokens_per_image

    build_index([str(work / "sft.json")], work / "sft_index", visual_tokens=visual_tokens_per_image(cfg.model),
                image_root=str(work / "sft_images"), tokenizer=str(work / "tok"), progress=False, config=cfg)
    return images, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["packed", "sft"], help="measure one loader only")
    ap.add_argument("--workdir", default=None, help="keep the data here (default: a temp folder)")
    args = ap.parse_args()

    import torch

    from vlmforge.arch.geometry import image_preprocess_spec
    from vlmforge.config import load_recipe
    from vlmforge.data.pretrain.loader import build_pretrain_loader
    from vlmforge.data.sft.loader import build_sft_loader
    from vlmforge.text.tokenization import load_tokenizer

    torch.set_num_threads(1)  # the loaders' work is single-threaded PIL/numpy; keep torch out of the way
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    images, manifest = build(work, args.images, args.width, args.height)
    cfg = load_recipe(None, MODEL + ["pack.max_len=4096", f"train.data_path={work / 'packed'}", "train.micro_batch_size=1",
                                     f"sft.index={work / 'sft_index'}", f"sft.image_root={work / 'sft_images'}",
                                     "sft.batching=length_group", "sft.max_len=4096"])
    spec = image_preprocess_spec(cfg.model)
    tok = load_tokenizer(work / "tok")
    workers = [int(w) for w in args.workers.split(",")]

    def packed(w):
        cfg.data.num_workers = w
        return build_pretrain_loader(cfg, rank=0, world_size=1)

    def sft(w):
        cfg.sft.num_workers = w
        return build_sft_loader(cfg, tok, batch_size=4, rank=0, world_size=1)

    rows = [("bare decode+resize+normalise", 0, lambda: bare_rate(images, spec, 1)),
            ("bare, 2 processes", 2, lambda: bare_rate(images, spec, 2))]
    for name, make in (("packed", packed), ("sft", sft)):
        if args.only in (None, name):
            rows += [(f"{name} w={w}", w, (lambda make=make, w=w: loader_rate(make, w))) for w in workers]
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in rows}
    for r in range(args.repeats):
        k = r % len(rows)
        for name, _, fn in rows[k:] + rows[:k]:
            results[name].append(fn())
    print(f"{args.images} JPEGs {args.width}x{args.height} (~{np.mean([len(b) for b in images]) / 1024:.0f} KiB), "
          f"{manifest['counts']['packs']} packs (fill {manifest['fill']['mean_fill']:.4f}); SFT rows of 1 "
          f"conversation, 4 per batch; {args.repeats} repeats, median (each repeat)")
    med = {name: [statistics.median(col) for col in zip(*runs)] for name, runs in results.items()}
    bare, bare_cpu, _ = med[rows[0][0]]
    print(f"{'':30}{'images/s':>9}{'vs bare':>8}{'per worker':>11}{'CPU main/workers':>18}{'worker eff.':>12}"
          f"{'CPU eff.':>9}   each repeat: images/s")
    for name, w, _ in rows:
        rate, own, kids = med[name]
        per = f"{rate / (w * bare):11.2f}" if w else f"{'':11}"
        eff = f"{bare_cpu / kids:12.2f}" if kids > 0 else f"{'':12}"
        cpu = f"{own * 1000:.2f} / {kids * 1000:.2f}"
        each = " ".join(f"{r:.0f}" for r, _, _ in results[name])
        print(f"{name:30}{rate:9.1f}{rate / bare:8.2f}{per}{cpu:>18}{eff}{bare_cpu / (own + kids):9.2f}   {each}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
