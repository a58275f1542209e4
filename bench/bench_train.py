"""Training throughput on the tiny VLM, measured side by side in one run (single process, CPU):

  packed vs padded   real (non-pad) tokens/s of our training loop on the caption distribution
                     (lognormal caption lengths, 16 visual tokens per image): packed rows of
                     pack.max_len tokens from `vlmforge pack` vs one sample per row padded to the
                     longest row of its batch (about the same number of real tokens per step)
  overhead           our Trainer.train_step vs a bare forward + cross-entropy + backward + AdamW
                     step of the same model on the same in-memory tensors
  data wait          share of the step time spent waiting for the PackedLoader (main process)

Per-step medians (the first 2 steps skipped); each measurement is repeated --repeats times,
alternating, and the median over repeats is printed.

    python bench/bench_train.py --samples 512 --steps 20
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "a the red blue green small large dog cat tree house car person street sky water field at on in near with".split()
    return [" ".join(rng.choice(words) for _ in range(max(5, int(rng.lognormvariate(np.log(16), 0.6))))) for _ in range(n)]


def jpeg(i: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class ListLoader:
    """Fixed batches with the loader protocol the Trainer expects (state = position)."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        self.pos = int(sd["pos"])


def steady(rows, key):
    vals = [r[key] for r in rows[2:]]  # skip the first steps (allocator / lazy init warm-up)
    return statistics.median(vals)


def run_trainer(cfg, model, loader, steps, run_dir):
    import torch

    from vlmforge.files import read_metrics
    from vlmforge.train.loop import Trainer

    Trainer(cfg.train, model, loader, steps, run_dir, torch.device("cpu")).fit()
    return read_metrics(run_dir)


def bare_steps(model, batches, lr: float) -> list[float]:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    times = []
    for b in batches:
        t = time.perf_counter()
        logits = model(input_ids=b["input_ids"], pixel_values=b.get("pixel_values"),
                       position_ids=b["position_ids"], seq_ids=b["seq_ids"])
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro-batch", type=int, default=4, help="packed rows per step")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady timings on a shared machine)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from vlmforge.config import load_recipe
    from vlmforge.data.collate import collate_packs
    from vlmforge.data.pretrain.loader import build_pretrain_loader, dataset_from_recipe
    from vlmforge.data.pretrain.plan import pack_shards
    from vlmforge.model.build import build_vlm
    from vlmforge.shards import ShardWriter
    from vlmforge.text.tokenization import load_tokenizer, train_tokenizer

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    caps = captions(args.samples)
    train_tokenizer(caps, work / "tok", vocab_size=300, min_frequency=1)
    with ShardWriter(work / "shards", samples_per_shard=256, timestamps=False) as w:
        for i, cap in enumerate(caps):
            w.write(w.next_key(), jpeg(i), cap, {})
    common = ["train.progress_bar=false", "train.tensorboard=false", "train.report=false", "train.lr=1e-3",
              "train.warmup_steps=1", "data.num_workers=0", "model.vision.frozen=true"]
    cfg = load_recipe("tiny/pretrain", common + [
        f"pack.max_len={args.max_len}", f"train.data_path={work / 'packed'}", f"tokenizer.path={work / 'tok'}",
        f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.micro_batch}"])
    manifest = pack_shards(cfg, [str(work / "shards")], work / "packed", str(work / "tok"), progress=False)
    tok = load_tokenizer(work / "tok")
    ds = dataset_from_recipe(cfg)

    # padded baseline: the same samples, one per row, dynamic padding, ~ the same real tokens per step
    samples = [s for i in range(len(ds)) for s in ds[i]]
    random.Random(0).shuffle(samples)
    mean_len = statistics.mean(len(s["input_ids"]) for s in samples)
    fill = manifest["fill"]["mean_fill"]
    pad_bs = max(1, round(args.micro_batch * args.max_len * fill / mean_len))
    padded = [collate_packs([[s] for s in samples[i : i + pad_bs]], ds.pad_id)
              for i in range(0, len(samples) - pad_bs + 1, pad_bs)]
    cfg_pad = load_recipe("tiny/pretrain", common + [f"tokenizer.path={work / 'tok'}",
                          f"train.micro_batch_size={pad_bs}", f"train.global_batch_size={pad_bs}"])
    steps = min(args.steps, len(padded), len(build_pretrain_loader(cfg, rank=0, world_size=1)))
    packed_mem = []
    for b in build_pretrain_loader(cfg, rank=0, world_size=1):
        packed_mem.append(b)
        if len(packed_mem) == steps:
            break

    def model():
        return build_vlm(cfg.model, tok, seed=0)

    res = {k: [] for k in ("packed_tps", "packed_frac", "packed_wait", "padded_tps", "padded_frac", "ours", "bare")}
    for r in range(args.repeats):
        rows = run_trainer(cfg, model(), build_pretrain_loader(cfg, rank=0, world_size=1), steps, work / f"run_packed{r}")
        res["packed_tps"].append(steady(rows, "tokens_per_s"))
        res["packed_frac"].append(steady(rows, "real_token_fraction"))
        res["packed_wait"].append(sum(x["data_wait"] for x in rows[2:]) / sum(x["step_time"] for x in rows[2:]))
        rows = run_trainer(cfg_pad, model(), ListLoader(padded[:steps]), steps, work / f"run_padded{r}")
        res["padded_tps"].append(steady(rows, "tokens_per_s"))
        res["padded_frac"].append(steady(rows, "real_token_fraction"))
        rows = run_trainer(cfg, model(), ListLoader(packed_mem), steps, work / f"run_mem{r}")
        res["ours"].append(steady(rows, "step_time"))
        res["bare"].append(statistics.median(bare_steps(model(), packed_mem, 1e-3)[2:]))
    med = {k: statistics.median(v) for k, v in res.items()}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.samples} captions, "
          f"{manifest['counts']['packs']} packs of <= {args.max_len} tokens (fill {fill:.3f}), {steps} steps x {args.repeats} repeats")
    print(f"{'layout':<34}{'real tok/s':>12}{'real fraction':>15}{'rows/step':>11}")
    print(f"{'packed (vlmforge pack)':<34}{med['packed_tps']:>12.0f}{med['packed_frac']:>15.3f}{args.micro_batch:>11}")
    print(f"{'padded (1 sample/row, dynamic)':<34}{med['padded_tps']:>12.0f}{med['padded_frac']:>15.3f}{pad_bs:>11}")
    print(f"packed / padded real tokens/s: {med['packed_tps'] / med['padded_tps']:.2f}x")
    print(f"step time, same model and tensors: ours {med['ours'] * 1e3:.1f} ms, bare fwd+CE+bwd+AdamW "
          f"{med['bare'] * 1e3:.1f} ms -> framework overhead {(med['ours'] / med['bare'] - 1) * 100:+.1f}%")
    print(f"data wait (PackedLoader, main process): {med['packed_wait'] * 100:.1f}% of step time")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
