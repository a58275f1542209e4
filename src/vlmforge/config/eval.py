"""Evaluation section (owned by vlmforge.eval). ``vlmforge eval`` flags override these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from vlmforge.config.ranges import ranged


@dataclass
class EvalConfig:
    # Task specs: built-in names (synth-mcq, synth-vqa, synth-pope, synth-math, synth-multi, synth = the first three), KIND:PATH, NAME=KIND:PATH, or a .yaml.
    tasks: list[str] = field(default_factory=list)
    synth_dir: Optional[str] = None  # `vlmforge synth` output folder, for the built-in task names
    limit: Optional[int] = ranged(None, ge=1)  # first N questions per task (a circular question counts once)
    batch_size: int = ranged(8, ge=1)
    max_new_tokens: int = ranged(16, ge=1)
    shots: list[int] = ranged(factory=lambda: [0], ge=0)  # e.g. [0, 8]: the 0-shot vs 8-shot table
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # k-shot demonstration draws (mean, std)
    strict: bool = True  # bad rows / undecodable images: error (True) or skip and count (False)
    # Image paths in task rows must stay inside the task's image_root (symlinks resolved), else the
    # row is refused as path_outside_root; True also accepts absolute paths (read as they are).
    allow_absolute_paths: bool = False
    # Multiple choice: generate (parse the letter of the reply) and/or likelihood (rank the option
    # texts by the model's likelihood, SEED-Bench style; results under NAME@likelihood).
    mc_protocols: list[Literal["generate", "likelihood"]] = field(default_factory=lambda: ["generate"])
    # Best-of-N (InternVL / VisualPRM), generate protocol: N replies per question, candidate 0 greedy and
    # the others sampled at temperature / top_p; one is selected and the BoN-k curves reported. 1: off.
    best_of_n: int = ranged(1, ge=1)
    critic: Optional[str] = None  # process reward model checkpoint (train.stage=prm) scoring every step
    # prm: best aggregate of step scores; orm: best last-step score; majority: most frequent answer;
    # first: greedy. None: prm with a critic, else majority.
    select: Optional[Literal["prm", "orm", "majority", "first"]] = None
    aggregate: Literal["mean", "min", "last", "product"] = "mean"  # a candidate's PRM score from its steps
    temperature: float = ranged(0.7, gt=0)
    top_p: float = ranged(0.95, gt=0, le=1)
    sample_seed: int = 0  # candidate j of item i draws from hash(sample_seed, run seed, i, j)
