"""`vlmforge preference build` under torchrun (gloo): two ranks write the one-rank pairs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_model import tiny_checkpoint
from test_preference_build import make_questions

from vlmforge.cli import main


@pytest.mark.slow
def test_two_ranks_match_one_rank_on_the_tiny_checkpoint(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        if shutil.which("torchrun") is None:
            pytest.skip("torchrun not installed")
        torchrun = Path(shutil.which("torchrun"))
    ckpt, _, _ = tiny_checkpoint(tmp_path)
    root = make_questions(tmp_path / "q", n=5)
    args = ["preference", "build", "--ckpt", str(ckpt), "--questions", f"mcq:{root / 'mcq.jsonl'}",
            f"pope:{root / 'pope.jsonl'}", "--long-answers", str(root / "long.jsonl"), "--samples", "3",
            "--max-new-tokens", "4", "--batch-size", "3", "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "vlmforge", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: one thread beats several contending for a shared CPU
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "two" / "pairs.jsonl").read_bytes() == (tmp_path / "one" / "pairs.jsonl").read_bytes()
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert m1["counts"] == m2["counts"] and m1["per_task"] == m2["per_task"] and m2["world_size"] == 2
    assert m1["counts"]["samples"] == 30 and m1["counts"]["pairs_by_recipe"]["dropout_ntp"] == 5
    # ranks wrote parts 0, 2, ... and 1, 3, ...: every part is there once
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").iterdir())
    assert parts == sorted(p.name for p in (tmp_path / "one" / "parts").iterdir())
