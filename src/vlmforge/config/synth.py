"""Synthetic world section (owned by vlmforge.synth)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FaultConfig:
    """Faults injected into the caption shards; each is recorded in faults.jsonl."""

    mismatch_frac: float = 0.0


@dataclass
class SynthConfig:
    seed: int = 0
    image_size: int = 64
    num_captions: int = 2000
    samples_per_shard: int = 500
    faults: FaultConfig = field(default_factory=FaultConfig)
