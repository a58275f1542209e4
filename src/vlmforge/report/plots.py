"""PNG plots for the reports (matplotlib, Agg backend: no display needed).

Every plot here is laid out for its labels: horizontal bars put long names on the y axis, figure
heights grow with the number of rows, and noisy per-step series are drawn faint with a moving
mean on top, so a figure reads the same at 10 points or 2000.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg", force=True)  # before pyplot: files only, no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

# A series this long is drawn faint, with a moving mean over about 1/25 of it on top.
SMOOTH_FROM = 50
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig, out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def moving_mean(ys: Sequence[float], window: int) -> np.ndarray:
    """Mean of the ``window`` values centred on each point (fewer at the ends), same length as
    ``ys``; centred, so a falling loss is not drawn late."""
    y = np.asarray(ys, dtype=float)
    csum = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(len(y))
    lo = np.maximum(idx - window // 2, 0)
    hi = np.minimum(idx + window // 2 + 1, len(y))
    return (csum[hi] - csum[lo]) / (hi - lo)


def smooth_window(n: int) -> int:
    return max(5, n // 25)


def _draw_series(ax, xs, ys, label: str, color: str, smooth: bool) -> None:
    if smooth and len(xs) >= SMOOTH_FROM:
        w = smooth_window(len(xs))
        ax.plot(xs, ys, color=color, linewidth=0.8, alpha=0.25)
        ax.plot(xs, moving_mean(ys, w), color=color, linewidth=1.8, label=f"{label} (mean of {w} steps)")
    else:
        ax.plot(xs, ys, color=color, label=label, linewidth=1.4, marker="." if len(xs) < 40 else None)


def _series(rows: Sequence[dict], key: str, x: str = "step") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and x in r]
    return (list(zip(*pts)) if pts else ([], []))  # type: ignore[return-value]


def plot_series(
    rows: Sequence[dict],
    keys: Sequence[str],
    out_path: str | os.PathLike,
    title: str,
    ylabel: str = "",
    x: str = "step",
    logy: bool = False,
    smooth: bool = False,
) -> Path | None:
    """One line per key present in ``rows`` (rows without the key are skipped); None if no data.
    ``smooth``: long series are drawn faint with their moving mean on top."""
    series: dict[str, tuple] = {}
    for k in keys:
        pts = _series(rows, k, x)
        if not pts[0]:
            continue
        # identical series (e.g. two parameter groups on one learning rate) are one line, named together
        same = next((name for name, other in series.items() if other == pts), None)
        if same is None:
            series[k] = pts
        else:
            series[f"{same} = {k}"] = series.pop(same)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for i, (k, (xs, ys)) in enumerate(series.items()):
        _draw_series(ax, xs, ys, k, COLORS[i % len(COLORS)], smooth)
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylabel:
        ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5), useMathText=True)
    ax.grid(alpha=0.3)
    if len(series) > 1 or next(iter(series)) != ylabel or (smooth and len(next(iter(series.values()))[0]) >= SMOOTH_FROM):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)


def mpo_rewards_plot(rows: Sequence[dict], out_path: str | os.PathLike) -> Path | None:
    """MPO's implicit rewards: the chosen - rejected margin (above 0: the model prefers the right
    reply more than the reference model did) and the share of pairs with a positive margin."""
    margin = _series(rows, "rewards/margin")
    acc = _series(rows, "rewards/accuracy")
    if not margin[0] and not acc[0]:
        return None
    panels = [p for p in ((margin, "reward margin\n(chosen - rejected)", 0.0, "0: no preference"),
                          (acc, "reward accuracy\n(share of pairs with margin > 0)", 0.5, "0.5: a coin flip"))
              if p[0][0]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 2.6 * len(panels) + 0.4), dpi=100, sharex=True,
                             squeeze=False)
    for ax, ((xs, ys), ylabel, ref, ref_label), color in zip(axes[:, 0], panels, COLORS):
        _draw_series(ax, xs, ys, ylabel.split("\n")[0], color, smooth=True)
        ax.axhline(ref, color="k", linestyle="--", linewidth=1, label=ref_label)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0, 0].set_title("MPO: does the model come to prefer the right reply?")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    return _save(fig, out_path)


def training_plots(rows: Sequence[dict], out_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """The standard training plots: loss, learning rates, throughput, time per step, MFU (and
    MPO's loss terms and rewards when the run has them)."""
    out = Path(out_dir)
    lr_keys = sorted({k for r in rows for k in r if k.startswith("lr/")})
    specs = [
        ("Loss", ["loss"], "loss.png", "loss", True),
        ("Learning rate", lr_keys, "lr.png", "lr", False),
        ("Throughput (real tokens/s)", ["tokens_per_s"], "throughput.png", "tokens/s", True),
        ("Step time and data wait", ["step_time", "data_wait"], "step_time.png", "seconds", True),
        ("Gradient norm", ["grad_norm"], "grad_norm.png", "norm", True),
        ("Model FLOPs utilisation", ["mfu"], "mfu.png", "MFU", True),
        ("MPO loss terms", ["loss/preference", "loss/quality", "loss/generation"], "mpo_losses.png", "loss", True),
    ]
    made = []
    for title, keys, name, ylabel, smooth in specs:
        p = plot_series(rows, keys, out / name, title, ylabel, smooth=smooth)
        if p is not None:
            made.append((title, p))
    p = mpo_rewards_plot(rows, out / "rewards.png")
    if p is not None:
        made.append(("MPO rewards", p))
    return made


EVAL_PREFIX = "eval/"


def is_eval_row(row: dict) -> bool:
    """A live evaluation's metrics row (``train.eval_every``): scores, no training step."""
    return any(k.startswith(EVAL_PREFIX) for k in row)


def eval_scores(rows: Sequence[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """``{task: {metric: (samples seen, scores)}}`` of the eval rows' ``eval/<task>/<metric>`` keys
    (the task is everything before the last slash)."""
    out: dict[str, dict[str, tuple[list, list]]] = {}
    for r in rows:
        for k, v in r.items():
            if not k.startswith(EVAL_PREFIX) or not isinstance(v, (int, float)) or "samples_seen" not in r:
                continue
            task, _, metric = k[len(EVAL_PREFIX):].rpartition("/")
            xs, ys = out.setdefault(task or metric, {}).setdefault(metric, ([], []))
            xs.append(r["samples_seen"])
            ys.append(v)
    return out


COUNT_METRICS = {"tp", "fp", "tn", "fn"}


def is_score(metric: str, ys: Sequence[float]) -> bool:
    """A metric worth a scaling curve: a share in [0, 1], not a count (n_questions, tp, ...)."""
    return not metric.startswith("n_") and metric not in COUNT_METRICS and all(0 <= v <= 1 for v in ys)


def eval_curves_plot(rows: Sequence[dict], out_path: str | os.PathLike) -> Path | None:
    """Scaling curves: each task's scores against the training samples seen so far, one panel per
    task, one line per score (counts are left to the report's table); None without eval rows."""
    tasks = {task: {m: xy for m, xy in metrics.items() if is_score(m, xy[1])}
             for task, metrics in eval_scores(rows).items()}
    tasks = {task: metrics for task, metrics in tasks.items() if metrics}
    if not tasks:
        return None
    cols = min(len(tasks), 2)
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows + 0.3), dpi=100, squeeze=False)
    for ax, (task, metrics) in zip(axes.flat, tasks.items()):
        for (metric, (xs, ys)), color in zip(metrics.items(), COLORS * 4):
            ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.4, color=color, label=metric)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("training samples seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.suptitle("Benchmarks during training")
    fig.tight_layout()
    return _save(fig, out_path)


def losses_plot(runs: Sequence[tuple[str, Sequence[dict]]], out_path: str | os.PathLike) -> Path | None:
    """The loss of several training runs side by side, one panel each (their scales differ)."""
    runs = [(name, _series(rows, "loss")) for name, rows in runs]
    runs = [(name, s) for name, s in runs if s[0]]
    if not runs:
        return None
    cols = 2 if len(runs) == 4 else min(len(runs), 3)  # 2 x 2 rather than 3 + 1
    nrows = -(-len(runs) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows + 0.3), dpi=100, squeeze=False)
    for ax, (name, (xs, ys)), color in zip(axes.flat, runs, COLORS * 4):
        _draw_series(ax, xs, ys, "loss", color, smooth=True)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    axes[0, 0].set_ylabel("loss")
    fig.tight_layout()
    return _save(fig, out_path)


def format_seconds(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def timeline_plot(labels: Sequence[str], seconds: Sequence[float], kinds: Sequence[str],
                  out_path: str | os.PathLike, title: str = "Time per stage") -> Path | None:
    """Horizontal bars, one per stage in run order (top first), coloured by kind, each labelled
    with its time; the title gives the total."""
    if not labels:
        return None
    n = len(labels)
    fig, ax = plt.subplots(figsize=(9.0, 0.32 * n + 1.3), dpi=100)
    y = np.arange(n)
    palette = {k: COLORS[i % len(COLORS)] for i, k in enumerate(dict.fromkeys(kinds))}
    ax.barh(y, seconds, color=[palette[k] for k in kinds], height=0.7)
    top = max(seconds) if max(seconds) > 0 else 1.0
    for yi, s in zip(y, seconds):
        ax.text(s + top * 0.01, yi, format_seconds(s), va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("seconds")
    ax.set_title(f"{title} (total {format_seconds(sum(seconds))})")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in palette.items()], fontsize=8,
              loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, out_path)


def grouped_hbar_plot(labels: Sequence[str], groups: dict[str, Sequence[float | None]],
                      marks: Sequence[float | None], out_path: str | os.PathLike, title: str,
                      xlabel: str = "score", mark_label: str = "chance") -> Path | None:
    """One row of bars per label (a bar per group, top to bottom in the groups' order), the value
    written at each bar's end, and a dashed mark per row (e.g. chance). Missing values are left out."""
    if not labels:
        return None
    n, g = len(labels), len(groups)
    height = 0.8 / g
    fig, ax = plt.subplots(figsize=(9.0, (0.16 * g + 0.22) * n + 1.2), dpi=100)
    y = np.arange(n)
    for i, (name, vals) in enumerate(groups.items()):
        pos = y - 0.4 + (i + 0.5) * height
        shown = [(p, v) for p, v in zip(pos, vals) if v is not None]
        if not shown:
            continue
        ps, vs = zip(*shown)
        ax.barh(ps, vs, height * 0.92, label=name, color=COLORS[i % len(COLORS)])
        for p, v in shown:
            ax.text(v + 0.005, p, f"{v:.2f}", va="center", fontsize=7)
    for yi, m in zip(y, marks):
        if m is not None:
            ax.vlines(m, yi - 0.45, yi + 0.45, colors="k", linestyles="dashed", linewidth=1.2,
                      label=mark_label if yi == next(i for i, mm in enumerate(marks) if mm is not None) else None)
    ax.set_yticks(y, labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, out_path)


def curves_plot(panels: Sequence[tuple[str, Sequence[int], dict[str, Sequence[float]], str]],
                out_path: str | os.PathLike, styles: dict[str, dict], xlabel: str, title: str) -> Path | None:
    """Line plots against a doubling x (1, 2, 4, ...): one panel per (title, xs, {name: ys}, ylabel),
    lines drawn with ``styles[name]`` (label, colour, line style) in the styles' order; one legend
    under the panels."""
    panels = [p for p in panels if p[1] and p[2]]
    if not panels:
        return None
    cols = min(len(panels), 2)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.3 * nrows), dpi=100, squeeze=False)
    legend: dict = {}
    for ax, (name, xs, curves, ylabel) in zip(axes.flat, panels):
        for key, style in styles.items():
            if key in curves and len(curves[key]) == len(xs):
                (line,) = ax.plot(xs, curves[key], marker="o", markersize=4, **style)
                legend.setdefault(style.get("label", key), line)
        values = [v for key in styles if key in curves for v in curves[key] if isinstance(v, (int, float))]
        if values and 0 <= min(values) and max(values) < 0.05:  # all (near) 0: show 0 to 0.1, lines above the axis
            ax.set_ylim(-0.003, 0.1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(list(legend.values()), list(legend), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=2 if cols > 1 else 1, fontsize=9, frameon=False)
    return _save(fig, out_path)
