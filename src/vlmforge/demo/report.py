"""The demo's report: benchmark scores before/after each stage next to chance, loss curves,
what curation and packing did, and the commands that ran."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmforge.config import load_recipe
from vlmforge.config.train import TrainConfig
from vlmforge.files import atomic_write_text, write_json
from vlmforge.report.builder import Section, build_report
from vlmforge.report.plots import plt

PHASES = [("before training", "init"), ("after pretraining", "pretrain"), ("after SFT", "sft"), ("after MPO", "mpo")]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _find(obj, key: str):
    """The first value stored under ``key`` anywhere in a nested manifest."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def score_table(out_dir: Path) -> list[dict]:
    """One row per benchmark: headline metric, chance, and the score at each phase."""
    phases = {label: _read_json(out_dir / "eval" / name / "results.json").get("tasks", {}) for label, name in PHASES}
    tasks = list(dict.fromkeys(t for res in phases.values() for t in res))
    rows = []
    for task in tasks:
        ref = next(res[task] for res in phases.values() if task in res)
        # every metric the scorer gives a chance level for (MCQ: plain and circular accuracy; POPE: accuracy, F1)
        for metric in dict.fromkeys([ref["primary"], *ref["chance"]]):
            row = {"benchmark": task, "metric": metric, "chance": ref["chance"].get(metric)}
            for label, res in phases.items():
                row[label] = res[task]["metrics"].get(metric) if task in res else None
            row["n"] = ref["counts"]["n"]
            rows.append(row)
    return rows


def _scores_text(rows: list[dict]) -> str:
    head = f"{'benchmark':<21} {'metric':<18} {'chance':>7} " + " ".join(f"{label:>18}" for label, _ in PHASES)
    lines = [head]
    for r in rows:
        cells = " ".join(f"{'-' if r[label] is None else format(r[label], '.3f'):>18}" for label, _ in PHASES)
        chance = "-" if r["chance"] is None else f"{r['chance']:.3f}"
        lines.append(f"{r['benchmark']:<21} {r['metric']:<18} {chance:>7} {cells}")
    return "\n".join(lines) + "\n"


def _score_plot(rows: list[dict], path: Path) -> Path | None:
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9.0, 4.6), dpi=100)
    x = np.arange(len(rows))
    width = 0.8 / len(PHASES)
    half = len(PHASES) / 2
    for i, (label, _) in enumerate(PHASES):
        ax.bar(x + (i - half + 0.5) * width, [r[label] or 0.0 for r in rows], width, label=label)
    for xi, r in zip(x, rows):
        if r["chance"] is not None:
            ax.hlines(r["chance"], xi - half * width, xi + half * width, colors="k", linestyles="dashed",
                      label="chance" if xi == 0 else None)
    # two-line labels, slanted, so neighbours never overlap
    ax.set_xticks(x, [f"{r['benchmark']}\n{r['metric']}" for r in rows], fontsize=8, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title("Held-out synthetic benchmarks")
    ax.legend(fontsize=8, loc="upper left", ncol=len(PHASES) + 1)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _pool(pool_size) -> str:
    return "the full patch grid" if pool_size is None else f"pooled to {pool_size}x{pool_size}"


def _vision_targets(folder) -> str:
    """What vision-pretrain taught the tower, with its held-out accuracy (from its manifest)."""
    acc = _read_json(Path(folder) / "manifest.json").get("holdout_accuracy") or {}
    what = "shape, colour and size of the object in each cell of the 3x3 grid"
    if "position" in acc:
        what += ", and which cell each patch is"
    return what + "; " + ("held-out accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
                          if acc else "accuracy not recorded")


def _what_was_trained(out_dir: Path) -> str:
    cfg = load_recipe(out_dir / "runs" / "sft" / "config.yaml")
    pre = load_recipe(out_dir / "runs" / "pretrain" / "config.yaml")
    m = cfg.model
    vision = "trained (unfrozen) in both stages" if not m.vision.frozen and not pre.model.vision.frozen else (
        "frozen" if m.vision.frozen and pre.model.vision.frozen else
        f"frozen in pretraining: {pre.model.vision.frozen}, in SFT: {m.vision.frozen}")
    origin = (f"pretrained by `vlmforge vision-pretrain` on the world's labelled objects "
              f"({_vision_targets(m.vision.pretrained)}), "
              f"loaded from {m.vision.pretrained}" if m.vision.pretrained
              else "randomly initialised (no pretrained weights exist offline)")
    return (
        f"Vision tower: {origin}; {vision} in the VLM. "
        f"Projector: {m.projector.kind}, {_pool(pre.model.projector.pool_size)} in pretraining and "
        f"{_pool(m.projector.pool_size)} in SFT, randomly initialised. "
        f"Language model: {m.llm.preset}, randomly initialised, trained in both stages. "
        f"Attention over packs: {m.attention}; positions: {m.positions}. "
        f"Optimizer: pretraining {_optimizer(pre.train)}; SFT {_optimizer(cfg.train)}."
        + _what_mpo_did(out_dir)
    )


def _what_mpo_did(out_dir: Path) -> str:
    if not (out_dir / "runs" / "mpo" / "config.yaml").is_file():
        return ""
    mpo = load_recipe(out_dir / "runs" / "mpo" / "config.yaml")
    counts = _read_json(out_dir / "preference" / "pairs" / "manifest.json").get("counts", {})
    pairs = counts.get("pairs_by_recipe", {})
    return (f" MPO: {counts.get('pairs', '?')} pairs the SFT model made itself ({pairs.get('correctness', 0)} right vs wrong "
            f"sampled replies to training-split questions, sample accuracy {counts.get('sample_accuracy', 0):.2f}; "
            f"{pairs.get('dropout_ntp', 0)} by dropout next-token prediction), DPO {mpo.mpo.preference_weight:g} + "
            f"BCO {mpo.mpo.quality_weight:g} + LM {mpo.mpo.generation_weight:g}, beta {mpo.mpo.beta:g}, "
            f"{_optimizer(mpo.train)}.")


def _optimizer(tcfg: TrainConfig) -> str:
    if tcfg.optimizer == "muon":
        return f"Muon (lr {tcfg.muon_lr:g}) on weight matrices, AdamW (lr {tcfg.lr:g}) on the rest"
    return f"AdamW (lr {tcfg.lr:g})"


def write_demo_report(out_dir: Path, stage_rows: list[dict], size: str, curated: bool) -> Path:
    rows = score_table(out_dir)
    atomic_write_text(out_dir / "scores.txt", _scores_text(rows))
    sections = [Section("What was trained", text=_what_was_trained(out_dir))]
    plot = _score_plot(rows, out_dir / "plots" / "scores.png")
    sections.append(Section("Benchmarks (held-out images) vs chance", table=rows, images=[plot] if plot else []))
    for stage in ("pretrain", "sft", "mpo"):
        for name in ("loss.png", "throughput.png", "rewards.png"):
            png = out_dir / "runs" / stage / "plots" / name
            if png.is_file():
                sections.append(Section(f"{stage}: {name[:-4]}", images=[png],
                                        html=f'<p><a href="runs/{stage}/report.html">full {stage} report</a></p>'))
    summary: dict = {"size": size, "scores": rows, "stages": stage_rows}
    if curated:
        gt = _find(_read_json(out_dir / "curate" / "filtered" / "manifest.json"), "ground_truth")
        dd = _find(_read_json(out_dir / "curate" / "curated" / "manifest.json"), "ground_truth")
        summary["curation"] = {"filter": gt, "dedup": dd}
        if gt:
            keep = ("mismatched", "mismatched_removed", "mismatch_recall", "clean", "clean_kept_frac", "precision")
            sections.append(Section("Curation: mismatched captions found by the trained filter network",
                                    table=[{k: gt.get(k) for k in keep}]))
        if dd:
            sections.append(Section("Curation: duplicates", table=[
                {"kind": kind, **{k: v for k, v in (dd.get(kind) or {}).items() if not isinstance(v, (dict, list))}}
                for kind in ("exact", "near") if isinstance(dd.get(kind), dict)]))
    fill = _read_json(out_dir / "packed" / "manifest.json").get("fill")
    if fill:
        summary["packing"] = fill
        sections.append(Section("Packing", table=[fill]))
    sections.append(Section("Stages (each is a command you can run yourself)", table=stage_rows))
    write_json(out_dir / "demo_summary.json", summary)
    return build_report(out_dir, sections, title=f"vlmforge demo ({size})")
