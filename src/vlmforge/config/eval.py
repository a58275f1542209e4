"""Evaluation section (owned by vlmforge.eval). ``vlmforge eval`` flags override these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class EvalConfig:
    # Task specs: built-in names (synth-mcq, synth-vqa, synth-pope, synth), KIND:PATH, NAME=KIND:PATH, or a .yaml.
    tasks: list[str] = field(default_factory=list)
    synth_dir: Optional[str] = None  # `vlmforge synth` output folder, for the built-in task names
    limit: Optional[int] = None  # first N questions per task (a circular question counts once)
    batch_size: int = 8
    max_new_tokens: int = 16
    shots: list[int] = field(default_factory=lambda: [0])  # e.g. [0, 8]: the 0-shot vs 8-shot table
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # k-shot demonstration draws (mean, std)
    strict: bool = True  # bad rows / undecodable images: error (True) or skip and count (False)
    # Multiple choice: generate (parse the letter of the reply) and/or likelihood (rank the option
    # texts by the model's likelihood, SEED-Bench style; results under NAME@likelihood).
    mc_protocols: list[Literal["generate", "likelihood"]] = field(default_factory=lambda: ["generate"])
