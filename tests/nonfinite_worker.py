"""The real training loop on the tiny VLM with a NaN loss injected at one optimizer step (on one
rank, or all); launched by tests/test_bad_input_numbers.py (plain python, or torchrun for two ranks).

usage: nonfinite_worker.py RUN_DIR STEPS POISON_STEP POISON_RANK|all [--set key=value ...]
Exits 2 with one line on stderr when training stops at a non-finite step (as `vlmforge train` does).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from fixtures_train import build_tiny_vlm, synthetic_loader, tiny_recipe
from torch import nn

from vlmforge import dist as vdist
from vlmforge.train.loop import NonFiniteStepError, Trainer


class InfGrad(torch.autograd.Function):
    """Identity forward; infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def poison_at(model: nn.Module, accum: int, step: int | None, what: str = "loss") -> nn.Module:
    """The model, except that optimizer step ``step`` (1-based; ``accum`` forwards per step) gets a
    NaN loss (``what="loss"``) or an infinite gradient with a finite loss (``what="grad"``)."""
    calls = [0]

    def hook(module, args, logits):
        calls[0] += 1
        if (calls[0] - 1) // accum + 1 != step:
            return None
        return logits * float("nan") if what == "loss" else InfGrad.apply(logits)

    model.register_forward_hook(hook)
    return model


def main(argv: list[str]) -> int:
    run_dir, steps, poison_step, poison_rank = argv[0], int(argv[1]), int(argv[2]), argv[3]
    overrides = [a for a in argv[4:] if a != "--set"]
    info = vdist.init_distributed("cpu")
    torch.set_num_threads(1)
    cfg = tiny_recipe([f"train.max_steps={steps}", *overrides])
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * info.world_size)
    model = build_tiny_vlm(cfg, seed=0)
    if poison_rank in ("all", str(info.rank)):
        poison_at(model, accum, poison_step)
    loader = synthetic_loader(cfg, model, rank=info.rank, world=info.world_size)
    try:
        Trainer(cfg.train, model, loader, total_steps=steps, run_dir=run_dir, device=info.device).fit()
    except NonFiniteStepError as e:
        print(f"rank {info.rank}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        vdist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
