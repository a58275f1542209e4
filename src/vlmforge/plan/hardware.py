"""The GPUs `vlmforge plan` knows: memory and dense bf16 peak (no sparsity), from the vendors' data sheets."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # what the device reports (nvidia-smi's total), the budget of one process
    peak_bf16_flops: float  # dense, per second

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


GPUS = {
    "a100-40g": GPU("A100 40GB (SXM)", 40 * GIB, 312e12),
    "a100-80g": GPU("A100 80GB (SXM)", 80 * GIB, 312e12),
    "h100": GPU("H100 80GB (SXM)", 80 * GIB, 989e12),
    "h200": GPU("H200 141GB (SXM)", 141 * 10**9, 989e12),
    "b200": GPU("B200 180GB", 180 * 10**9, 2250e12),
}
