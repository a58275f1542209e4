"""MPO batch layouts side by side: pairs/s and peak memory of forward + backward of the per-pair
log-prob sums, on the same preference pairs, at 729 visual tokens per image (SigLIP's 27 x 27 grid).

  shared        vlmforge's shared-prompt packing: [prompt][chosen][rejected] per pair, shorter
                pairs sharing a row up to the longest pair's width (document attention), each
                image encoded once
  duplicated    vlmforge's fallback: rows [prompt + chosen], [prompt + rejected], padded, each image
                encoded once (image_map)
  internvl      the InternVL / TRL layout: the padded [chosen; rejected] batch, each pair's prompt
                twice and its images encoded twice

Model: a tower with SigLIP-so400m's geometry (384 px, patch 14 -> 27 x 27 = 729 tokens, full grid
through an `mlp` projector) but tiny width, and a small Qwen2-shaped LM (--llm-hidden, --llm-layers),
all parameters trainable (as InternVL's MPO trains). Pairs: one image, a question of 15-30 words,
responses of about 50-150 tokens. Batches are built once by the preference loader (data loading is
not timed). Each layout runs in a fresh subprocess, alternating, --repeats times: pairs/s is the
median pass over all pairs (the first pass is a warm-up), by the wall clock and per CPU second of
the process (steadier on a shared machine with one thread); peak memory is, on CPU, the growth of the
process's peak resident set (getrusage ru_maxrss) over its resident set before the first pass, and
on CUDA torch.cuda.max_memory_allocated over the allocation before the first pass.

    python bench/mpo_layout.py                       # CPU, a few minutes
    python bench/mpo_layout.py --device cuda --pairs 64 --batch 8 --llm-hidden 2048 --llm-layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import synthetic_jpeg

LAYOUTS = ("shared", "duplicated", "internvl")
WORDS = ("the a red blue green yellow small large circle square triangle star shape image left right top bottom "
         "center next to is are there one two three four colour picture shows on in of with and near above below "
         "answer because so first then count each object").split()


def _text(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1)))).capitalize() + "."


def make_data(work: Path, args) -> None:
    """Images, MMPR-style rows, a tokenizer trained on them, and the preference index."""
    from vlmforge.data.preference.build import build_preference_index
    from vlmforge.text.tokenization import train_tokenizer

    rng = np.random.default_rng(0)
    (work / "img").mkdir(parents=True)
    rows = []
    for i in range(args.pairs):
        (work / "img" / f"{i}.jpg").write_bytes(synthetic_jpeg(i, 384, 384))
        rows.append({"image": f"{i}.jpg", "question": _text(rng, 15, 30) + " Explain.",
                     "chosen": _text(rng, args.response_words[0], args.response_words[1]),
                     "rejected": _text(rng, args.response_words[0], args.response_words[1])})
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = [r[k] for r in rows for k in ("question", "chosen", "rejected")]
    train_tokenizer(corpus, work / "tok", vocab_size=400, min_frequency=1)
    tower = json.loads(_asset("tiny-siglip.json"))
    tower.update(image_size=384, patch_size=14)  # SigLIP-so400m-patch14-384's grid: 27 x 27
    (work / "tower.json").write_text(json.dumps(tower))
    llm = json.loads(_asset("small-qwen2.json"))
    heads = max(1, args.llm_hidden // 128)  # head dim 128, grouped KV, as Qwen2.5's
    llm.update(hidden_size=args.llm_hidden, intermediate_size=3 * args.llm_hidden, num_hidden_layers=args.llm_layers,
               num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    (work / "llm.json").write_text(json.dumps(llm))
    build_preference_index([work / "pairs.jsonl"], work / "idx", tokenizer=work / "tok", visual_tokens=729,
                           max_len=args.max_len, image_root=work / "img", progress=False, config=None)


def _asset(name: str) -> str:
    import vlmforge

    return (Path(vlmforge.__file__).parent / "assets" / "configs" / name).read_text()


def _recipe(work: Path, args):
    from vlmforge.config import load_recipe

    return load_recipe(None, [
        f"model.vision.preset={work / 'tower.json'}", "model.vision.frozen=false", f"model.llm.preset={work / 'llm.json'}",
        "model.projector.kind=mlp", "model.attention=document", f"preference.index={work / 'idx'}",
        f"preference.max_len={args.max_len}", "preference.shuffle=false", f"tokenizer.path={work / 'tok'}"])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    """One layout in this process: build model and batches, time passes, print one JSON line."""
    import torch
    import torch.nn.functional as F

    from vlmforge.arch.geometry import image_preprocess_spec, visual_tokens_per_image
    from vlmforge.data.preference.layouts import pair_logprob_sums
    from vlmforge.data.preference.loader import build_preference_loader
    from vlmforge.model.build import build_vlm
    from vlmforge.text.tokenization import load_tokenizer

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cfg = _recipe(work, args)
    tok = load_tokenizer(work / "tok")
    device = torch.device(args.device)
    model = build_vlm(cfg.model, tok, seed=0).to(device).train()
    vt = visual_tokens_per_image(cfg.model)
    loader = build_preference_loader(cfg, tok, batch_size=args.batch, seed=0, rank=0, world_size=1, visual_tokens=vt,
                                     image_spec=image_preprocess_spec(cfg.model),
                                     layout="shared" if args.child == "shared" else "duplicated")
    batches = list(loader.reference_batches(args.batch))
    if args.child == "internvl":  # every image once per row that shows it: encoded twice per pair
        for b in batches:
            b["pixel_values"] = b["pixel_values"][b.pop("image_map")]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    cells = sum(b["input_ids"].numel() for b in batches)
    real = sum(int((b["seq_ids"] >= 0).sum()) for b in batches)
    images = sum(int(b["pixel_values"].shape[0]) for b in batches)
    rows = sum(int(b["input_ids"].shape[0]) for b in batches)

    def one_pass() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        for b in batches:
            extra = {k: b[k] for k in ("pixel_values", "position_ids", "seq_ids", "branch_ids", "image_map") if k in b}
            lp = model(b["input_ids"], output="target_logprobs", pred_index=b["pred_index"], target_ids=b["target_ids"],
                       **extra)
            chosen, rejected = pair_logprob_sums(lp, b, dtype=torch.float32)
            n_chosen = torch.bincount(b["target_pair"][b["target_side"] == 0], minlength=chosen.numel())
            loss = -F.logsigmoid(0.1 * (chosen - rejected)).sum() - (chosen / n_chosen).sum()  # DPO + LM terms
            loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, time.process_time() - c

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = [one_pass() for _ in range(args.passes)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    timed = times[1:] or times
    print(json.dumps({"layout": args.child, "pass_s": statistics.median(t for t, _ in timed),
                      "pass_cpu_s": statistics.median(c for _, c in timed), "pairs": loader.num_pairs,
                      "peak_bytes": peak, "rows": rows, "cells": cells, "real": real, "images": images,
                      "visual_tokens": vt}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="pairs per micro-batch")
    ap.add_argument("--max-len", type=int, default=2048, help="preference.max_len: the longest prompt + response")
    ap.add_argument("--llm-hidden", type=int, default=512)
    ap.add_argument("--llm-layers", type=int, default=2)
    ap.add_argument("--response-words", type=int, nargs=2, default=(40, 110), metavar=("MIN", "MAX"))
    ap.add_argument("--passes", type=int, default=3, help="passes over all pairs per run (the first is a warm-up)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady timings on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", choices=LAYOUTS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name) / "mpo_layout"
    t0 = time.perf_counter()
    make_data(work, args)
    man = json.loads((work / "idx" / "manifest.json").read_text())["counts"]
    forwarded = ["--batch", str(args.batch), "--max-len", str(args.max_len), "--passes", str(args.passes),
                 "--threads", str(args.threads), "--device", args.device]
    res: dict[str, list[dict]] = {k: [] for k in LAYOUTS}
    for r in range(args.repeats):
        for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
            out = subprocess.run([sys.executable, __file__, *forwarded, "--child", layout, "--work", str(work)],
                                 check=True, capture_output=True, text=True).stdout
            res[layout].append(json.loads(out.strip().splitlines()[-1]))
    first = {k: v[0] for k, v in res.items()}
    pps = {k: first[k]["pairs"] / statistics.median(x["pass_s"] for x in v) for k, v in res.items()}
    ppc = {k: first[k]["pairs"] / statistics.median(x["pass_cpu_s"] for x in v) for k, v in res.items()}
    peak = {k: statistics.median(x["peak_bytes"] for x in v) / 2**20 for k, v in res.items()}
    import torch

    mem = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss growth"
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s); {man['pairs']} pairs, "
          f"{first['shared']['visual_tokens']} visual tokens/image, prompt {man['prompt_tokens_mean']:.0f} tokens, "
          f"responses {man['chosen_tokens_mean']:.0f} / {man['rejected_tokens_mean']:.0f} tokens (mean); "
          f"LM {args.llm_layers} x {args.llm_hidden}; {args.batch} pairs/micro-batch, max_len {args.max_len}; "
          f"{args.passes - 1} timed pass(es) x {args.repeats} repeats")
    print(f"{'layout':<12}{'pairs/s':>9}{'pairs/cpu-s':>13}{'peak MiB':>10}{'rows':>6}{'tokens computed':>17}"
          f"{'real':>8}{'images encoded':>16}")
    for k in LAYOUTS:
        f = first[k]
        print(f"{k:<12}{pps[k]:>9.3f}{ppc[k]:>13.3f}{peak[k]:>10.0f}{f['rows']:>6}{f['cells']:>17}{f['real']:>8}"
              f"{f['images']:>16}")
    for k in ("internvl", "duplicated"):
        print(f"shared / {k}: {pps['shared'] / pps[k]:.2f}x pairs/s ({ppc['shared'] / ppc[k]:.2f}x per CPU second), "
              f"{peak['shared'] / peak[k]:.2f}x peak memory ({mem})")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
