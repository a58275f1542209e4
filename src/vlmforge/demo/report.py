"""The demo's report: what was trained, every benchmark score at every phase next to chance, a
gallery of held-out questions answered after SFT and after MPO, MPO's rewards, Best-of-N, what
curation and packing did, the loss curves, and a timeline of the commands that ran.

One function per section (the gallery in `gallery.py`, Best-of-N and the critic in `scaling.py`); a
section whose inputs are missing says so in a note instead.
Writes ``report.html`` (self-contained: plots and thumbnails embedded), ``scores.txt``,
``demo_summary.json`` and ``plots/*.png`` into the demo folder."""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

from vlmforge.config import load_recipe
from vlmforge.config.train import TrainConfig
from vlmforge.demo.gallery import gallery_section
from vlmforge.demo.report_common import PHASES, find_key, fmt, missing, read_json
from vlmforge.demo.scaling import best_of_n_section, critic_section
from vlmforge.files import atomic_write_text, read_metrics, write_json
from vlmforge.report.builder import Section, build_report, table_html
from vlmforge.report.plots import (
    eval_curves_plot,
    format_seconds,
    grouped_hbar_plot,
    losses_plot,
    moving_mean,
    mpo_rewards_plot,
    smooth_window,
    timeline_plot,
)

# Training runs in pipeline order; runs/ folders not listed here follow, by name.
RUN_ORDER = ("pretrain", "sft", "mpo", "prm")

# ---------------------------------------------------------------- what was trained

def _pool(pool_size) -> str:
    return "the full patch grid" if pool_size is None else f"pooled to {pool_size}x{pool_size}"


def _vision_targets(folder) -> str:
    """What vision-pretrain taught the tower, with its held-out accuracy (from its manifest)."""
    acc = read_json(Path(folder) / "manifest.json").get("holdout_accuracy") or {}
    what = "shape, colour and size of the object in each cell of the 3x3 grid"
    if "position" in acc:
        what += ", and which cell each patch is"
    return what + "; " + ("held-out accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
                          if acc else "accuracy not recorded")


def _optimizer(tcfg: TrainConfig) -> str:
    if tcfg.optimizer == "muon":
        return f"Muon (lr {tcfg.muon_lr:g}) on weight matrices, AdamW (lr {tcfg.lr:g}) on the rest"
    return f"AdamW (lr {tcfg.lr:g})"


def _what_mpo_did(out_dir: Path) -> str:
    if not (out_dir / "runs" / "mpo" / "config.yaml").is_file():
        return ""
    mpo = load_recipe(out_dir / "runs" / "mpo" / "config.yaml")
    counts = read_json(out_dir / "preference" / "pairs" / "manifest.json").get("counts", {})
    pairs = counts.get("pairs_by_recipe", {})
    return (f"MPO: {counts.get('pairs', '?')} pairs the SFT model made itself ({pairs.get('correctness', 0)} right vs wrong "
            f"sampled replies to training-split questions, sample accuracy {counts.get('sample_accuracy', 0):.2f}; "
            f"{pairs.get('dropout_ntp', 0)} by dropout next-token prediction), DPO {mpo.mpo.preference_weight:g} + "
            f"BCO {mpo.mpo.quality_weight:g} + LM {mpo.mpo.generation_weight:g}, beta {mpo.mpo.beta:g}, "
            f"{_optimizer(mpo.train)}.")


def _what_was_trained(out_dir: Path) -> list[str]:
    """One sentence per part of the model (and MPO), from the runs' resolved configs."""
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
    items = [
        f"Vision tower: {origin}; {vision} in the VLM.",
        f"Projector: {m.projector.kind}, {_pool(pre.model.projector.pool_size)} in pretraining and "
        f"{_pool(m.projector.pool_size)} in SFT, randomly initialised.",
        f"Language model: {m.llm.preset}, randomly initialised, trained in both stages. "
        f"Attention over packs: {m.attention}; positions: {m.positions}.",
        f"Optimizer: pretraining {_optimizer(pre.train)}; SFT {_optimizer(cfg.train)}.",
    ]
    mpo = _what_mpo_did(out_dir)
    return items + ([mpo] if mpo else [])


def _trained_section(out_dir: Path) -> Section:
    title = "What was trained"
    if not all((out_dir / "runs" / s / "config.yaml").is_file() for s in ("pretrain", "sft")):
        return missing(title, "runs/pretrain/config.yaml or runs/sft/config.yaml is missing")
    items = "".join(f"<li>{html.escape(t)}</li>" for t in _what_was_trained(out_dir))
    return Section(title, html=f"<ul>{items}</ul>")


# ---------------------------------------------------------------- benchmarks

def score_table(out_dir: Path) -> list[dict]:
    """One row per benchmark: headline metric, chance, and the score at each phase."""
    phases = {label: read_json(out_dir / "eval" / name / "results.json").get("tasks", {}) for label, name in PHASES}
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


def _benchmarks_section(rows: list[dict], plots: Path) -> Section:
    title = "Benchmarks (held-out images) vs chance"
    if not rows:
        return missing(title, "no eval/*/results.json")
    shown = []
    for r in rows:
        row = {"benchmark": r["benchmark"], "metric": r["metric"], "chance": fmt(r["chance"])}
        row.update({label: fmt(r[label]) for label, _ in PHASES})
        sft, mpo = r.get("after SFT"), r.get("after MPO")
        row["MPO - SFT"] = "-" if sft is None or mpo is None else f"{mpo - sft:+.3f}"
        row["n"] = r["n"]
        shown.append(row)
    plot = grouped_hbar_plot(
        [f"{r['benchmark']}\n{r['metric'].replace('_', ' ')}" for r in rows],
        {label: [r[label] for r in rows] for label, _ in PHASES},
        [r["chance"] for r in rows], plots / "scores.png", "Held-out synthetic benchmarks")
    text = ("Each benchmark's headline metric and every other metric with a chance level, before training and "
            "after each training stage; n counts the scored prompts (MCQ by letter asks every question in 4 "
            "rotations of its options: CircularEval counts a question right only if all 4 are).")
    return Section(title, text=text, table=shown, images=[plot] if plot else [])


# ---------------------------------------------------------------- MPO

def _tail_mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(moving_mean(vals, smooth_window(len(vals)))[-1]) if vals else None


def _mpo_section(out_dir: Path, plots: Path) -> Section:
    title = "MPO: reward margin"
    rows = read_metrics(out_dir / "runs" / "mpo")
    plot = mpo_rewards_plot(rows, plots / "mpo_rewards.png")
    if plot is None:
        return missing(title, "runs/mpo/metrics.jsonl has no rewards/margin")
    margin, acc = _tail_mean(rows, "rewards/margin"), _tail_mean(rows, "rewards/accuracy")
    text = ("MPO's implicit reward of a reply is beta x (its log-probability under the model - under the SFT "
            "model it started from). The margin is the chosen (right) reply's reward minus the rejected one's: "
            "above 0, training moved the model towards the right replies; reward accuracy is the share of pairs "
            f"where it did. Over the last steps: margin {fmt(margin, 2)}, reward accuracy {fmt(acc, 2)}.")
    return Section(title, text=text, images=[plot],
                   html='<p><a href="runs/mpo/report.html">the MPO run\'s report</a> (loss terms, throughput)</p>'
                   if (out_dir / "runs" / "mpo" / "report.html").is_file() else "")


def _sft_curves_section(out_dir: Path, plots: Path) -> Section:
    """The SFT run's live evaluations (train.eval_points): each benchmark against SFT samples seen."""
    title = "Benchmarks during SFT"
    plot = eval_curves_plot(read_metrics(out_dir / "runs" / "sft"), plots / "sft_eval.png")
    if plot is None:
        return missing(title, "runs/sft/metrics.jsonl has no live evaluations (train.eval_points=0)")
    text = ("The SFT run scored its live model on the first questions of each benchmark (train.eval_points; "
            "greedy, 0-shot) before its first step, at every sixth of the run and after its last: the scores "
            "against the conversations seen so far, Open-Qwen2VL's scaling curves at the demo's size.")
    return Section(title, text=text, images=[plot],
                   html='<p><a href="runs/sft/report.html">the SFT run\'s report</a> (the scores as a table)</p>'
                   if (out_dir / "runs" / "sft" / "report.html").is_file() else "")


# ---------------------------------------------------------------- curation

def curation_table(out_dir: Path) -> list[dict]:
    """Per kind of caption pair (clean, then each injected fault): how many were in the crawl, kept
    by the filter, dropped by the filter network or as unreadable, removed by dedup, and left."""
    gt = find_key(read_json(out_dir / "curate" / "filtered" / "manifest.json"), "ground_truth") or {}
    dd = find_key(read_json(out_dir / "curate" / "curated" / "manifest.json"), "ground_truth") or {}
    if not gt:
        return []
    world = find_key(read_json(out_dir / "world" / "manifest.json"), "captions") or {}
    totals = dict(world.get("faults") or {})
    if "clean" in world:
        totals = {"clean": world["clean"], **totals}
    removed, corrupt = gt.get("removed_by_fault") or {}, gt.get("corrupt_by_fault") or {}
    deduped: Counter = Counter()
    for key, v in (dd.get("removed_by_fault") or {}).items():
        deduped[key.split("|")[0]] += v
    kinds = list(dict.fromkeys(["clean", *sorted(totals, key=lambda k: -totals[k]), *removed, *corrupt]))
    rows = []
    for kind in kinds:
        row = {"caption pair": kind.replace("_", " ")}
        if kind in totals:
            row["in the crawl"] = totals[kind]
            row["kept by the filter"] = totals[kind] - removed.get(kind, 0) - corrupt.get(kind, 0)
        row["dropped: filter network"] = removed.get(kind, 0)
        row["dropped: unreadable"] = corrupt.get(kind, 0)
        if dd:
            row["removed by dedup"] = deduped.get(kind, 0)
            if kind in totals:
                row["left in the curated set"] = row["kept by the filter"] - deduped.get(kind, 0)
        rows.append(row)
    faulty = [r for r, k in zip(rows, kinds) if k != "clean"]
    if faulty:
        total = {"caption pair": "all faulty"}
        for col in rows[0]:
            if col != "caption pair" and all(col in r for r in faulty):
                total[col] = sum(r[col] for r in faulty)
        rows.append(total)
    return rows


def _curation_section(out_dir: Path, curated: bool) -> Section:
    title = "Curation: what was kept and dropped, clean vs faulty"
    if not curated:
        return missing(title, "the demo ran with --no-curate")
    rows = curation_table(out_dir)
    if not rows:
        return missing(title, "curate/filtered/manifest.json has no ground_truth (curate filter ran without --ground-truth)")
    gt = find_key(read_json(out_dir / "curate" / "filtered" / "manifest.json"), "ground_truth") or {}
    dd = find_key(read_json(out_dir / "curate" / "curated" / "manifest.json"), "ground_truth") or {}
    text = (f"The world's crawl has faults injected on purpose (listed in world/captions/faults.jsonl). The filter "
            f"network found {gt.get('mismatched_removed', '?')} of {gt.get('mismatched', '?')} mismatched captions "
            f"(recall {fmt(gt.get('mismatch_recall'), 2)}) and kept {fmt(gt.get('clean_kept_frac'), 2)} of the clean "
            f"pairs; of what it dropped, {fmt(gt.get('precision'), 2)} were mismatches and "
            f"{fmt(gt.get('precision_any_fault'), 2)} any fault.")
    if dd:
        text += (f" Dedup removes exact copies (groups left with one copy: "
                 f"{dd.get('exact_duplicate_groups_with_one_copy_left', '?')}); a clean pair it removes is the "
                 f"original of a copy that was kept instead (which one survives is arbitrary); clean pairs lost "
                 f"otherwise: {dd.get('clean_removed', '?')}. Near duplicates stay: the world repeats scenes on purpose.")
    return Section(title, text=text, html=table_html(rows, total_last=rows[-1]["caption pair"] == "all faulty"))


def _packing_section(out_dir: Path) -> Section | None:
    fill = read_json(out_dir / "packed" / "manifest.json").get("fill")
    if not fill:
        return None
    shown = {k.replace("_", " "): f"{v:.3f}" if isinstance(v, float) else v for k, v in fill.items()}
    return Section("Packing", text="Captions packed into fixed-length sequences for pretraining; fill is the share "
                   "of each sequence holding real tokens.", table=[shown])


# ---------------------------------------------------------------- training curves

def _training_runs(out_dir: Path) -> list[str]:
    names = [p.parent.name for p in sorted((out_dir / "runs").glob("*/metrics.jsonl"))]
    return sorted(names, key=lambda n: (RUN_ORDER.index(n) if n in RUN_ORDER else len(RUN_ORDER), n))


def _training_section(out_dir: Path, plots: Path) -> Section:
    title = "Training loss"
    names = _training_runs(out_dir)
    plot = losses_plot([(n, read_metrics(out_dir / "runs" / n)) for n in names], plots / "losses.png")
    if plot is None:
        return missing(title, "no runs/*/metrics.jsonl")
    links = " · ".join(f'<a href="runs/{n}/report.html">{html.escape(n)}</a>' for n in names
                       if (out_dir / "runs" / n / "report.html").is_file())
    return Section(title, images=[plot], html=f"<p>Each run's own report (learning rate, throughput, gradient norm): "
                                              f"{links}</p>" if links else "")


# ---------------------------------------------------------------- timeline and commands

def stage_kind(row: dict) -> str:
    """What a stage did, from its command: training, evaluation, or data."""
    words = str(row.get("command", "")).split()[1:3]
    if words[:1] in (["train"], ["vision-pretrain"]) or words == ["curate", "train-filter"]:
        return "training"
    if words[:1] in (["eval"], ["prm-score"]) or str(row.get("stage", "")).lower().startswith("eval"):
        return "evaluation"
    return "data"


def timeline_rows(stage_rows: list[dict]) -> list[tuple[str, float, str]]:
    """(stage, seconds, kind) of every timed stage, in run order: whatever stages ran, with no list
    of known stages to keep up to date."""
    return [(str(r.get("stage", "?")), float(r["seconds"]), stage_kind(r)) for r in stage_rows
            if isinstance(r.get("seconds"), (int, float))]


def _timeline_section(stage_rows: list[dict], plots: Path) -> Section:
    title = "Timeline"
    rows = timeline_rows(stage_rows)
    if not rows:
        return missing(title, "no stage timings")
    labels, seconds, kinds = zip(*rows)
    plot = timeline_plot(labels, seconds, kinds, plots / "timeline.png", "Seconds per stage")
    return Section(title, images=[plot] if plot else [])


def _stages_section(stage_rows: list[dict]) -> Section:
    title = "Stages (each is a command you can run yourself)"
    if not stage_rows:
        return missing(title, "no stages recorded")
    body = "".join(
        f"<tr><td class=\"num\">{i}</td><td>{html.escape(str(r.get('stage', '')))}</td>"
        f"<td class=\"num\">{html.escape(format_seconds(r['seconds']) if isinstance(r.get('seconds'), (int, float)) else '')}</td>"
        f"<td><code>{html.escape(str(r.get('command', '')))}</code></td></tr>"
        for i, r in enumerate(stage_rows, 1))
    return Section(title, html="<table><thead><tr><th>#</th><th>stage</th><th>time</th><th>command</th></tr></thead>"
                               f"<tbody>{body}</tbody></table>")


def _intro(stage_rows: list[dict], size: str) -> str:
    seconds = sum(r["seconds"] for r in stage_rows if isinstance(r.get("seconds"), (int, float)))
    took = f" It took {format_seconds(seconds)} over {len(stage_rows)} stages." if stage_rows else ""
    return (f'<p class="lead">A small vision-language model trained from scratch on the built-in synthetic world '
            f"(images of coloured shapes on a 3x3 grid, captions, questions), size <b>{html.escape(size)}</b>: "
            f"curated captions, pretraining, SFT and MPO, each benchmark scored on held-out images before training "
            f"and after every stage.{took}</p>")


def write_demo_report(out_dir: Path, stage_rows: list[dict], size: str, curated: bool,
                      best_of_n: Path | None = None) -> Path:
    """``best_of_n``: the eval folder (or its results.json) of the Best-of-N eval; default: every
    eval/*/results.json with Best-of-N results."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    rows = score_table(out_dir)
    atomic_write_text(out_dir / "scores.txt", _scores_text(rows))
    sections = [
        _trained_section(out_dir),
        _benchmarks_section(rows, plots),
        _sft_curves_section(out_dir, plots),
        gallery_section(out_dir),
        _mpo_section(out_dir, plots),
        best_of_n_section(out_dir, Path(best_of_n) if best_of_n is not None else None, plots),
        critic_section(out_dir),
        _curation_section(out_dir, curated),
        _packing_section(out_dir),
        _training_section(out_dir, plots),
        _timeline_section(stage_rows, plots),
        _stages_section(stage_rows),
    ]
    summary: dict = {"size": size, "scores": rows, "stages": stage_rows}
    if curated:
        summary["curation"] = {
            "filter": find_key(read_json(out_dir / "curate" / "filtered" / "manifest.json"), "ground_truth"),
            "dedup": find_key(read_json(out_dir / "curate" / "curated" / "manifest.json"), "ground_truth"),
            "table": curation_table(out_dir)}
    fill = read_json(out_dir / "packed" / "manifest.json").get("fill")
    if fill:
        summary["packing"] = fill
    write_json(out_dir / "demo_summary.json", summary)
    return build_report(out_dir, [s for s in sections if s is not None], title=f"vlmforge demo ({size})",
                        intro=_intro(stage_rows, size))
