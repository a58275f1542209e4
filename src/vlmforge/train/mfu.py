"""Model FLOPs, TFLOPs/s per device and MFU of each training step.

MFU = model FLOPs per second per device / the device's peak. Model FLOPs are counted by
:mod:`vlmforge.model.flops` from the step's micro-batches (real tokens, attention spans from
seq_ids, images), so they do not depend on activation checkpointing, the chunked loss or compile:
a faster implementation of the same model shows as a higher MFU.

Peak: dense bf16 tensor-core TFLOPS of the GPU, matched by name (NVIDIA's datasheets); a GPU not in
the table and any CPU get a short matmul probe in the compute dtype instead (run once per process),
so on CPU MFU says how close the step comes to this machine's own matmul speed.
"""

from __future__ import annotations

import functools
import time

import torch

from vlmforge import dist as vdist
from vlmforge.config.train import TrainConfig
from vlmforge.model.flops import FlopsCounts, batch_flops, flops_counts
from vlmforge.train.parallel import resolve_precision

# (substring of torch.cuda.get_device_name, dense bf16 TFLOPS); more specific names first
PEAK_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
)


def table_peak(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


@functools.lru_cache(maxsize=None)
def matmul_probe_tflops(device_type: str, dtype: torch.dtype, threads: int, size: int = 1024,
                        seconds: float = 0.3) -> float:
    """Best achieved TFLOPS of ``size``^3 matmuls on this device over about ``seconds``."""
    device = torch.device(device_type)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    torch.matmul(a, b)  # warm-up (thread pools, kernels)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e12


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOPS, where it comes from) for MFU on ``device`` computing in ``dtype``."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name)
        if peak is not None:
            return peak, f"{name}: bf16 dense peak {peak:g} TFLOPS (datasheet)"
        probe = matmul_probe_tflops("cuda", dtype, 0, size=4096)
        return probe, f"{name}: not in the peak table; matmul probe {probe:.1f} TFLOPS ({str(dtype).split('.')[-1]})"
    threads = torch.get_num_threads()
    probe = matmul_probe_tflops(device.type, dtype, threads)
    return probe, f"{device.type}: matmul probe {probe * 1e3:.1f} GFLOPS ({str(dtype).split('.')[-1]}, {threads} threads)"


class StepFlops:
    """Per-step FLOPs and MFU for the trainer. Build once after the model is placed
    (``StepFlops(model, tcfg, device)``), then per step
    ``step_flops.metrics(step_total, step_time, world)`` with the step's FLOPs summed over ranks (the
    trainer sums ``flops(micro_batches)`` in its own all-reduce); ``step_metrics`` does both for
    callers without one (bench/gpu_check.py), one scalar all-reduce, so every rank must call it."""

    def __init__(self, model, tcfg: TrainConfig, device: torch.device) -> None:
        self.device = torch.device(device)
        self.counts: FlopsCounts = flops_counts(model)
        self.peak_tflops, self.peak_source = device_peak(self.device, resolve_precision(tcfg, self.device))

    def flops(self, batches) -> dict[str, int]:
        """Model FLOPs of this rank's micro-batches, by part (llm, attention, vision) and total."""
        total = {"llm": 0, "attention": 0, "vision": 0, "total": 0}
        for batch in batches:
            for key, value in batch_flops(self.counts, batch).items():
                total[key] += value
        return total

    def step_metrics(self, batches, step_time: float) -> dict[str, float]:
        """``model_tflops`` (this step, all ranks), ``tflops_per_s`` (per device, mean over ranks) and
        ``mfu`` (tflops_per_s / peak) for metrics.jsonl."""
        local = torch.tensor([float(self.flops(batches)["total"])], dtype=torch.float64, device=self.device)
        return self.metrics(float(vdist.all_reduce_sum(local)[0]), step_time, vdist.world_size())

    def metrics(self, step_total: float, step_time: float, world: int) -> dict[str, float]:
        """The step's figures from its model FLOPs summed over ranks (the trainer sums them with its
        other step statistics, in the one all-reduce it makes anyway)."""
        per_device = step_total / world / step_time / 1e12 if step_time > 0 else 0.0
        return {
            "model_tflops": step_total / 1e12,
            "tflops_per_s": per_device,
            "mfu": per_device / self.peak_tflops if self.peak_tflops > 0 else 0.0,
        }

    def describe(self) -> str:
        return f"MFU against {self.peak_source}"

