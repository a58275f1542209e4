"""The LM head + log-softmax with all logits at once vs in chunks of tokens (vlmforge.model.lm_head),
side by side on CPU at Qwen2.5's vocabulary: peak memory and forward+backward time.

Each path runs in its own fresh subprocess so that one path's allocations cannot hide the other's.
Memory is the process's resident set: the peak is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(the kernel's high-water mark, so it counts every byte torch really touched) and the baseline is
the resident set just before the first timed forward, after the weight, the hidden states and a tiny
warm-up call exist. ``loss memory`` = peak - baseline: what the path adds (logits, their gradients,
the weight gradient). Time: forward + backward of ``sum(w_t * log p_t)`` with uneven weights w.
Each worker also writes its log-probs and a slice of its gradients, and the parent prints how far
apart the two paths are.

    python bench/chunked_loss.py                                   # vocab 151936, hidden 1536, 8192 tokens
    python bench/chunked_loss.py --tokens 2048 --chunk 512 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from vlmforge.model.lm_head import token_logprobs

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    head = nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0, 0.02)
    hidden0 = torch.randn(args.tokens, args.hidden)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    weights = torch.rand(args.tokens) * 2
    chunk = args.chunk if args.path == "chunked" else 0

    def step(n: int):
        hidden = hidden0[:n].clone().requires_grad_(True)
        head.weight.grad = None
        t0 = time.perf_counter()
        logp = token_logprobs(hidden, head, targets[:n], chunk)
        (logp * weights[:n]).sum().backward()
        return time.perf_counter() - t0, logp.detach(), hidden.grad

    step(8)  # loads the kernels; tiny, so it does not move the peak
    head.weight.grad = None
    base = rss_mb()
    times = []
    for _ in range(args.repeats):
        dt, logp, grad_h = step(args.tokens)
        times.append(dt)
    peak = peak_rss_mb()
    save_file({"logp": logp, "grad_hidden": grad_h, "grad_weight_rows": head.weight.grad[:4096].clone()},
              args.out)
    print(json.dumps({"path": args.path, "base_rss_mb": base, "peak_rss_mb": peak, "times_s": times}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_tokens for the chunked path")
    ap.add_argument("--repeats", type=int, default=1, help="timed forward+backward passes per path")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--order", default="chunked,full", help="which path runs first")
    ap.add_argument("--path", choices=["full", "chunked"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.path:
        worker(args)
        return
    import torch
    from safetensors.torch import load_file

    gib = args.tokens * args.vocab * 4 / 2**30
    print(f"vocab {args.vocab}, hidden {args.hidden}, {args.tokens} tokens, chunk {args.chunk} tokens, fp32, "
          f"torch threads {args.threads or torch.get_num_threads()}; one [tokens, vocab] fp32 tensor = {gib:.2f} GiB")
    results, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.order.split(","):
            out = str(Path(tmp) / f"{path}.safetensors")
            cmd = [sys.executable, __file__, "--path", path, "--out", out, *sys.argv[1:]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{path} path failed (exit {proc.returncode}; -9 = killed, e.g. out of memory):\n{proc.stderr[-2000:]}")
            results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
            tensors[path] = load_file(out)
    print(f"{'path':<9}{'peak RSS MiB':>14}{'baseline MiB':>14}{'loss memory MiB':>17}{'fwd+bwd s':>12}")
    for path in ("full", "chunked"):
        r = results[path]
        r["loss_mb"] = r["peak_rss_mb"] - r["base_rss_mb"]
        r["time_s"] = min(r["times_s"])
        print(f"{path:<9}{r['peak_rss_mb']:>14.0f}{r['base_rss_mb']:>14.0f}{r['loss_mb']:>17.0f}{r['time_s']:>12.2f}")
    full, chunked = results["full"], results["chunked"]
    print(f"chunked / full: peak RSS {chunked['peak_rss_mb'] / full['peak_rss_mb']:.3f}, "
          f"loss memory {chunked['loss_mb'] / full['loss_mb']:.3f} (goal <= 0.125), "
          f"time {chunked['time_s'] / full['time_s']:.3f}x (goal <= 1.15x; best of {args.repeats})")
    for name in ("logp", "grad_hidden", "grad_weight_rows"):
        a, b = tensors["full"][name], tensors["chunked"][name]
        rel = float((a - b).abs().max() / a.abs().max())
        print(f"max |full - chunked| / max |full| of {name}: {rel:.2e}")


if __name__ == "__main__":
    main()
