"""Evaluation section (owned by vlmforge.eval)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    batch_size: int = 8
