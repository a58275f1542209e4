"""Runs the real training loop on the tiny VLM and synthetic packed batches; launched by the
training tests as a subprocess (plain python, or torchrun for several ranks).

usage: train_worker.py RUN_ROOT STEPS REDUCTION[,REDUCTION...] [--set key=value ...]
Each reduction trains in RUN_ROOT/<reduction>; the losses land in its metrics.jsonl.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from fixtures_train import build_tiny_vlm, synthetic_loader, tiny_recipe

from vlmforge import dist as vdist
from vlmforge.train.loop import Trainer


def main(argv):
    root, steps, reductions = argv[0], int(argv[1]), argv[2].split(",")
    overrides = [a for a in argv[3:] if a != "--set"]
    info = vdist.init_distributed("cpu")
    torch.set_num_threads(1)
    for red in reductions:
        cfg = tiny_recipe([f"train.loss_reduction={red}", f"train.max_steps={steps}", *overrides])
        model = build_tiny_vlm(cfg, seed=0)
        loader = synthetic_loader(cfg, model, rank=info.rank, world=info.world_size)
        Trainer(cfg.train, model, loader, total_steps=steps, run_dir=os.path.join(root, red), device=info.device).fit()
    vdist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
