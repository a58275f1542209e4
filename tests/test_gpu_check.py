"""bench/gpu_check.sh runs end to end at its tiny CPU size: the flash check is skipped with a note,
every variant's FSDP2 step (fp32 on CPU) is finite, the full-logits and chunked-loss variants train
identically (and count the same model FLOPs), and the JSON and markdown reports hold tokens/s,
TFLOPs/s and MFU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_on_cpu(tmp_path):
    out = tmp_path / "gc"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--tiny", "--variants", "eager-full,eager-chunked",
         "--rows", "1", "--seq-len", "64", "--steps", "2", "--warmup", "1", "--chunk", "8"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["tiny"] and report["ok"]
    assert report["flash_check"]["status"] == "skipped" and "CUDA" in report["flash_check"]["note"]
    full, chunked = report["variants"]
    assert (full["variant"], chunked["variant"]) == ("eager-full", "eager-chunked")
    for v in (full, chunked):
        assert v["finite"] and v["sharded"] and len(v["losses"]) == 3
        assert v["tokens_per_s"] > 0 and v["tflops_per_s"] > 0 and 0 < v["mfu"] < 1
        assert "matmul probe" in v["peak_source"]
    assert max(abs(a - b) for a, b in zip(full["losses"], chunked["losses"])) <= 1e-5
    assert full["model_tflops_per_step"] == chunked["model_tflops_per_step"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "| eager-chunked |" in table and "skipped: no CUDA device" in table
