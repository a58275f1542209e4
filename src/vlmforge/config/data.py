"""Packing and data-loading sections (owned by vlmforge.data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PackConfig:
    max_len: int = 4096


@dataclass
class DataConfig:
    num_workers: int = 0
