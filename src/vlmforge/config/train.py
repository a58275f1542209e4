"""Training section (owned by vlmforge.train)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    stage: str = "pretrain"
