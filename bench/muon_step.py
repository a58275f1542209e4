"""Muon's optimizer step on the demo model's matrices: Newton-Schulz one matrix at a time vs one
batched iteration per group of same-shape matrices (``vlmforge.train.muon.orthogonalise_all``),
side by side in one process, rounds alternating so drift hits both alike.

    python bench/muon_step.py                       # demo/sft's model (small-qwen2 LM, 4 layers)
    python bench/muon_step.py --recipe tiny/sft --rounds 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlmforge.config import load_recipe
from vlmforge.model.build import build_meta_vlm
from vlmforge.train import muon as vmuon


def muon_matrices(recipe: str) -> list[torch.Tensor]:
    """Random matrices with the shapes Muon updates in ``recipe``'s model (2-D, not embeddings or head)."""
    model = build_meta_vlm(load_recipe(recipe).model)
    skip = {id(model.llm.get_input_embeddings().weight), id(model.llm.get_output_embeddings().weight)}
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*p.shape, generator=g) for n, p in model.named_parameters()
            if p.dim() == 2 and id(p) not in skip and p.requires_grad and "vision" not in n]


def one_by_one(mats, coeffs, steps, eps):
    return [vmuon.orthogonalise(m, coeffs, steps, eps) for m in mats]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo/sft")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as torch chooses)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mats = muon_matrices(args.recipe)
    shapes = sorted({tuple(m.shape) for m in mats})
    coeffs, steps, eps = (3.4445, -4.7750, 2.0315), 5, 1e-7
    variants = {"one by one": one_by_one, "batched by shape": vmuon.orthogonalise_all}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn(mats, coeffs, steps, eps)
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(mats, coeffs, steps, eps)
            times[name].append(time.perf_counter() - t0)
    print(f"{args.recipe}: {len(mats)} matrices, {len(shapes)} shapes, torch threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds")
    base = statistics.median(times["one by one"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:18s} median {med * 1e3:7.2f} ms  best {min(ts) * 1e3:7.2f} ms  time ratio {med / base:.2f}x")


if __name__ == "__main__":
    main()
