"""PNG line plots of per-step metrics (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg", force=True)  # before pyplot: files only, no display
import matplotlib.pyplot as plt


def plot_series(
    rows: Sequence[dict],
    keys: Sequence[str],
    out_path: str | os.PathLike,
    title: str,
    ylabel: str = "",
    x: str = "step",
    logy: bool = False,
) -> Path | None:
    """One line per key present in ``rows`` (rows without the key are skipped); None if no data."""
    series = {}
    for k in keys:
        pts = [(r[x], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and x in r]
        if pts:
            series[k] = pts
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for k, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=k, linewidth=1.2, marker="." if len(xs) < 40 else None)
    ax.set_title(title)
    ax.set_xlabel(x)
    if ylabel:
        ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def training_plots(rows: Sequence[dict], out_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """The standard training plots: loss, learning rates, throughput, time per step, MFU (and
    MPO's loss terms and rewards when the run has them)."""
    out = Path(out_dir)
    lr_keys = sorted({k for r in rows for k in r if k.startswith("lr/")})
    specs = [
        ("Loss", ["loss"], "loss.png", "loss"),
        ("Learning rate", lr_keys, "lr.png", "lr"),
        ("Throughput (real tokens/s)", ["tokens_per_s"], "throughput.png", "tokens/s"),
        ("Step time and data wait", ["step_time", "data_wait"], "step_time.png", "seconds"),
        ("Gradient norm", ["grad_norm"], "grad_norm.png", "norm"),
        ("Model FLOPs utilisation", ["mfu"], "mfu.png", "MFU"),
        # MPO runs: the loss terms and the rewards (chosen - rejected margin, reward shift)
        ("MPO loss terms", ["loss/preference", "loss/quality", "loss/generation"], "mpo_losses.png", "loss"),
        ("MPO rewards", ["rewards/margin", "rewards/accuracy", "reward_shift"], "rewards.png", ""),
    ]
    made = []
    for title, keys, name, ylabel in specs:
        p = plot_series(rows, keys, out / name, title, ylabel)
        if p is not None:
            made.append((title, p))
    return made
