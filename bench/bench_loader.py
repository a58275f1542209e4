"""Packed loader throughput vs the bare JPEG decode + resize cost, on one worker.

Builds caption shards of synthetic JPEGs (default 512x384, photo-like: smooth gradients + noise),
packs them for the Open-Qwen2VL pretraining geometry (SigLIP-so400m 384 px, 12x12 pooled = 144
visual tokens, max_len 4096), then measures in the same run, single process:

  bare       decode_image + bicubic resize to 384 (PIL), per image
  bare+norm  the same + rescale/normalise to a float tensor (what the model needs)
  loader     PackedLoader over the packed shards (read pack, decode, preprocess, collate)

    python bench/bench_loader.py --images 512
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import synthetic_jpeg
from PIL import Image


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "a the red blue green small large dog cat tree house car person street sky water field at on in near with".split()
    return [" ".join(rng.choice(words) for _ in range(max(5, int(rng.lognormvariate(np.log(16), 0.6))))) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--workdir", default=None, help="keep the shards here (default: a temp folder)")
    args = ap.parse_args()

    from vlmforge.arch.geometry import image_preprocess_spec
    from vlmforge.config import load_recipe
    from vlmforge.data.pretrain.loader import build_pretrain_loader
    from vlmforge.data.pretrain.plan import pack_shards
    from vlmforge.imagedecode import decode_image
    from vlmforge.images import load_pixel_values
    from vlmforge.shards import ShardWriter
    from vlmforge.text.tokenization import train_tokenizer

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    caps = captions(args.images)
    images = [synthetic_jpeg(i, args.width, args.height) for i in range(args.images)]
    train_tokenizer(caps, work / "tok", vocab_size=300, min_frequency=1)
    with ShardWriter(work / "shards", samples_per_shard=256, timestamps=False) as w:
        for img, cap in zip(images, caps):
            w.write(w.next_key(), img, cap, {})
    cfg = load_recipe(None, ["model.vision.preset=siglip-so400m-patch14-384", "model.projector.pool_size=12",
                             "pack.max_len=4096", "pack.window=10000", "data.num_workers=0",
                             f"train.data_path={work / 'packed'}", "train.micro_batch_size=1"])
    t = time.perf_counter()
    manifest = pack_shards(cfg, [str(work / "shards")], work / "packed", str(work / "tok"), progress=False)
    pack_s = time.perf_counter() - t
    spec = image_preprocess_spec(cfg.model)
    size = spec["size"]
    print(f"{args.images} JPEGs {args.width}x{args.height} (~{np.mean([len(b) for b in images]) / 1024:.0f} KiB) -> "
          f"{manifest['counts']['packs']} packs, fill {manifest['fill']['mean_fill']:.4f}; pack stage {pack_s:.2f} s "
          f"({args.images / pack_s:.0f} samples/s incl. full decode check)")

    t = time.perf_counter()
    for b in images:
        decode_image(b).resize((size, size), Image.Resampling.BICUBIC)
    bare = args.images / (time.perf_counter() - t)
    t = time.perf_counter()
    for b in images:
        load_pixel_values(b, spec)
    bare_norm = args.images / (time.perf_counter() - t)
    loader = build_pretrain_loader(cfg, rank=0, world_size=1)
    t = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["pixel_values"].shape[0]
    dt = time.perf_counter() - t
    assert n == args.images, n
    ld = n / dt
    print(f"{'one worker (main process)':<34}{'samples/s':>10}{'vs bare':>9}")
    for name, v in [("bare decode + resize", bare), ("bare + rescale/normalise", bare_norm), ("PackedLoader (full batches)", ld)]:
        print(f"{name:<34}{v:>10.1f}{v / bare:>9.2f}")
    print(f"loader overhead over bare decode+resize+normalise: {(bare_norm / ld - 1) * 100:.1f}%")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
