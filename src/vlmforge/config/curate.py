"""Curation section (owned by vlmforge.curate)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CurateConfig:
    samples_per_shard: int = 1000
