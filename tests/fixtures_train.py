"""Shared pieces for the training tests: the real tiny VLM and a synthetic packed-batch loader
whose global batches do not depend on the number of ranks (so 1 vs 2 ranks can be compared)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

from vlmforge.config import load_recipe

SEQ_LEN = 48
POOL = 2  # 2 x 2 = 4 visual tokens per image (tiny-siglip: 64 px, patch 8 -> 8 x 8 grid)
TOKENS_PER_IMAGE = POOL * POOL


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}


def one_torch_thread():
    """Body of an autouse fixture: torch on one thread for the test (steadier on a shared CPU), then
    back. Use as ``_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def square_png(colour: str) -> bytes:
    """A 64 x 64 PNG of one colour of COLOURS."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def write_caption_shards(out: Path, rng: random.Random, colours=None, n: int = 24) -> Path:
    """``n`` one-colour squares with their captions, 16 to a shard; colours drawn from ``colours``
    (default: sorted COLOURS) with ``rng``."""
    from vlmforge.shards import ShardWriter

    colours = sorted(COLOURS) if colours is None else colours
    w = ShardWriter(str(out), samples_per_shard=16)
    for i in range(n):
        c = rng.choice(colours)
        w.write(f"{i:05d}", square_png(c), f"A {c} square on a plain background.", {"uid": f"u{i}"})
    w.close()
    return out


def write_sft_json(root: Path, rng: random.Random, n: int = 12) -> Path:
    """``root/images/<i>.png`` and ``root/sft.json`` (LLaVA format, one colour question each);
    returns the images folder."""
    from PIL import Image

    images = root / "images"
    images.mkdir()
    records = []
    for i in range(n):
        c = rng.choice(sorted(COLOURS))
        Image.new("RGB", (64, 64), COLOURS[c]).save(images / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": f"The square is {c}."}]})
    (root / "sft.json").write_text(json.dumps(records))
    return images


def pack_captions(captions: Path, out: Path, tokenizer: str, max_len: int = 96) -> Path:
    """`vlmforge pack` with the tiny/pretrain recipe; asserts it succeeds."""
    from vlmforge.cli import main

    assert main(["pack", "--recipe", "tiny/pretrain", "--in", str(captions), "--out", str(out),
                 "--tokenizer", tokenizer, "--no-progress", "--set", f"pack.max_len={max_len}"]) == 0
    return out


def index_sft(root: Path, images: Path, tokenizer: str) -> Path:
    """`vlmforge sft-index` of ``root/sft.json`` into ``root/index``; asserts it succeeds."""
    from vlmforge.cli import main

    assert main(["sft-index", "--recipe", "tiny/sft", "--input", str(root / "sft.json"), "--out", str(root / "index"),
                 "--image-root", str(images), "--tokenizer", tokenizer, "--set", "sft.index_workers=1"]) == 0
    return root / "index"


def tiny_recipe(overrides=()):
    base = [
        "model.projector.pool_size=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.lr=1e-3",
        "train.warmup_steps=2",
        "train.grad_clip=1.0",
        "train.weight_decay=0.01",
        "train.progress_bar=false",
        "train.tensorboard=false",
        "train.report=false",
    ]
    return load_recipe(None, base + list(overrides))


def build_tiny_vlm(cfg, seed: int = 0):
    from vlmforge.model.build import build_vlm

    return build_vlm(cfg.model, tokenizer=None, seed=seed)


def make_row(index: int, seed: int, image_token_id: int, vocab: int, image_size: int = 64):
    """One packed row: 1-3 samples, each = image tokens + text; the tail is padding."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    ids, labels, pos, seq = [], [], [], []
    images = []
    n_samples = int(torch.randint(1, 4, (1,), generator=g))
    for s in range(n_samples):
        text_len = int(torch.randint(3, 10, (1,), generator=g))
        has_image = bool(torch.rand(1, generator=g) < 0.8)
        toks = [image_token_id] * (TOKENS_PER_IMAGE if has_image else 0)
        toks += torch.randint(5, vocab - 2, (text_len,), generator=g).tolist()
        if len(ids) + len(toks) > SEQ_LEN:
            break
        lab = [-100 if t == image_token_id else t for t in toks]
        lab[0] = -100  # first token of every packed sample
        ids += toks
        labels += lab
        pos += list(range(len(toks)))
        seq += [s] * len(toks)
        if has_image:
            images.append(torch.randn(3, image_size, image_size, generator=g))
    pad = SEQ_LEN - len(ids)
    ids += [0] * pad
    labels += [-100] * pad
    pos += [0] * pad
    seq += [-1] * pad
    return ids, labels, pos, seq, images


class SyntheticPackLoader:
    """Micro-batches of deterministic rows. The k-th micro-batch of rank r belongs to optimizer
    step k // accum; a step's global batch is rows [step*G, (step+1)*G), split contiguously over
    ranks and then micro-batches, so every rank layout sees the same global batches."""

    def __init__(self, rank, world, micro, global_batch, seed, image_token_id, vocab, limit=None):
        self.rank, self.world, self.micro, self.global_batch = rank, world, micro, global_batch
        self.accum = global_batch // (micro * world)
        self.seed, self.image_token_id, self.vocab = seed, image_token_id, vocab
        self.k = 0
        self.limit = limit  # micro-batches per epoch (None = endless)
        self.epoch = 0

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.k = 0
        self.epoch = epoch

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, sd):
        self.k = int(sd["k"])

    def batch(self, k):
        step, m = divmod(k, self.accum)
        start = step * self.global_batch + self.rank * self.accum * self.micro + m * self.micro
        rows = [make_row(self.epoch * 100_000 + start + i, self.seed, self.image_token_id, self.vocab) for i in range(self.micro)]
        out = {
            "input_ids": torch.tensor([r[0] for r in rows]),
            "labels": torch.tensor([r[1] for r in rows]),
            "position_ids": torch.tensor([r[2] for r in rows]),
            "seq_ids": torch.tensor([r[3] for r in rows]),
        }
        imgs = [im for r in rows for im in r[4]]
        if imgs:
            out["pixel_values"] = torch.stack(imgs)
        return out

    def __iter__(self):
        while self.limit is None or self.k < self.limit:
            b = self.batch(self.k)
            self.k += 1
            yield b


def synthetic_loader(cfg, model, rank=0, world=1, limit=None):
    t = cfg.train
    return SyntheticPackLoader(
        rank, world, t.micro_batch_size, t.global_batch_size, seed=7,
        image_token_id=model.image_token_id, vocab=model.llm.get_input_embeddings().num_embeddings, limit=limit,
    )


class CountSteps:
    """Counts the steps a loader's StepPlanner plans (in this process): wraps its ``plan``."""

    def __init__(self, planner):
        self.inner, self.calls = planner.plan, 0
        planner.plan = self

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)
