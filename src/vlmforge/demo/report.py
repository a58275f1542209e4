"""The demo's report: what was trained, every benchmark score at every phase next to chance, a
gallery of held-out questions answered after SFT and after MPO, MPO's rewards, Best-of-N, what
curation and packing did, the loss curves, and a timeline of the commands that ran.

One function per section; a section whose inputs are missing says so in a note instead.
Writes ``report.html`` (self-contained: plots and thumbnails embedded), ``scores.txt``,
``demo_summary.json`` and ``plots/*.png`` into the demo folder."""

from __future__ import annotations

import hashlib
import html
import json
from collections import Counter
from pathlib import Path

from vlmforge.config import load_recipe
from vlmforge.config.train import TrainConfig
from vlmforge.files import PathOutsideRootError, atomic_write_text, read_metrics, resolve_inside, write_json
from vlmforge.report.builder import Section, build_report, table_html
from vlmforge.report.gallery import Answer, Card, gallery_html
from vlmforge.report.plots import (
    curves_plot,
    format_seconds,
    grouped_hbar_plot,
    losses_plot,
    moving_mean,
    mpo_rewards_plot,
    smooth_window,
    timeline_plot,
)

PHASES = [("before training", "init"), ("after pretraining", "pretrain"), ("after SFT", "sft"), ("after MPO", "mpo")]
# Training runs in pipeline order; runs/ folders not listed here follow, by name.
RUN_ORDER = ("pretrain", "sft", "mpo", "prm")
GALLERY_SIZE = 12
# How many cards of each outcome the gallery tries for (in this order); a short group is filled from the others.
GALLERY_MIX = (("fixed", 4), ("broke", 4), ("right", 3), ("wrong", 1))
OUTCOMES = {"fixed": "MPO fixed", "broke": "MPO broke", "right": "both right", "wrong": "both wrong"}
FILL_ORDER = ("right", "fixed", "broke", "wrong")
# Best-of-N curves (contract C3) in legend order, with how they are drawn.
BEST_OF_N_STYLES = {
    "pass": {"label": "pass@N: any of the N right (the ceiling)", "color": "k", "linestyle": "--"},
    "prm": {"label": "PRM picks (critic's step scores)", "color": "C3"},
    "orm": {"label": "ORM picks (critic's whole-reply score)", "color": "C1"},
    "majority": {"label": "majority vote over the N answers", "color": "C0"},
    "first": {"label": "first sample (no selection)", "color": "C7", "linestyle": ":"},
}


def _read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return out if isinstance(out, dict) else {}


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file ([] if missing); a line cut by a kill or not an object is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


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


def _missing(title: str, what: str) -> Section:
    return Section(title, note=f"Not shown: {what}.")


# ---------------------------------------------------------------- what was trained

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


def _optimizer(tcfg: TrainConfig) -> str:
    if tcfg.optimizer == "muon":
        return f"Muon (lr {tcfg.muon_lr:g}) on weight matrices, AdamW (lr {tcfg.lr:g}) on the rest"
    return f"AdamW (lr {tcfg.lr:g})"


def _what_mpo_did(out_dir: Path) -> str:
    if not (out_dir / "runs" / "mpo" / "config.yaml").is_file():
        return ""
    mpo = load_recipe(out_dir / "runs" / "mpo" / "config.yaml")
    counts = _read_json(out_dir / "preference" / "pairs" / "manifest.json").get("counts", {})
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
        return _missing(title, "runs/pretrain/config.yaml or runs/sft/config.yaml is missing")
    items = "".join(f"<li>{html.escape(t)}</li>" for t in _what_was_trained(out_dir))
    return Section(title, html=f"<ul>{items}</ul>")


# ---------------------------------------------------------------- benchmarks

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


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _benchmarks_section(rows: list[dict], plots: Path) -> Section:
    title = "Benchmarks (held-out images) vs chance"
    if not rows:
        return _missing(title, "no eval/*/results.json")
    shown = []
    for r in rows:
        row = {"benchmark": r["benchmark"], "metric": r["metric"], "chance": _fmt(r["chance"])}
        row.update({label: _fmt(r[label]) for label, _ in PHASES})
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


# ---------------------------------------------------------------- gallery

def _stable_order(task: str, qid: str) -> str:
    return hashlib.sha256(f"{task}/{qid}".encode()).hexdigest()


def _generated(path: Path) -> dict[tuple[str, str], dict]:
    """(task, id) -> the prediction row of each question as asked (generated reply, 0-shot; not the
    likelihood protocol, not MCQ's extra option rotations)."""
    out: dict[tuple[str, str], dict] = {}
    for r in _read_jsonl(path):
        if r.get("protocol", "generate") != "generate" or r.get("shots", 0) not in (0, None):
            continue
        qid, task = str(r.get("id", "")), str(r.get("task", ""))
        if "#" in qid or not qid or (task, qid) in out:
            continue
        out[(task, qid)] = r
    return out


def _task_rows(out_dir: Path) -> dict[str, tuple[Path, dict[str, dict]]]:
    """task -> (folder its images are relative to, id -> row), for each .jsonl task of the evals."""
    found: dict[str, tuple[Path, dict[str, dict]]] = {}
    for _, name in PHASES:
        for task, res in _read_json(out_dir / "eval" / name / "results.json").get("tasks", {}).items():
            if task in found or not res.get("path"):
                continue
            path = Path(res["path"])
            if not path.is_file():  # the demo folder was moved: its world is still next to the evals
                path = out_dir / "world" / "eval" / path.name
            if path.suffix == ".jsonl" and path.is_file():
                found[task] = (path.parent, {str(r.get("id")): r for r in _read_jsonl(path)})
    return found


def _outcome(before: dict, after: dict) -> str:
    b, a = bool(before.get("correct")), bool(after.get("correct"))
    return {(False, True): "fixed", (True, False): "broke", (True, True): "right"}.get((b, a), "wrong")


def gallery_picks(out_dir: Path, n: int = GALLERY_SIZE) -> tuple[list[dict], Counter]:
    """``n`` held-out questions answered both after SFT and after MPO, a mix of outcomes
    (GALLERY_MIX), tasks taken in turn, chosen by a hash of task and id (the same every run).
    Returns the picks ({task, id, outcome, sft, mpo}) and the count of every outcome."""
    sft, mpo = _generated(out_dir / "eval" / "sft" / "predictions.jsonl"), _generated(
        out_dir / "eval" / "mpo" / "predictions.jsonl")
    groups: dict[str, dict[str, list]] = {k: {} for k in OUTCOMES}
    counts: Counter = Counter()
    for key in sorted(set(sft) & set(mpo), key=lambda k: _stable_order(*k)):
        outcome = _outcome(sft[key], mpo[key])
        counts[outcome] += 1
        groups[outcome].setdefault(key[0], []).append(key)

    def in_turn(by_task: dict[str, list]) -> list:
        queues = [list(v) for _, v in sorted(by_task.items())]
        order = []
        while any(queues):
            order.extend(q.pop(0) for q in queues if q)
        return order

    queues = {k: in_turn(v) for k, v in groups.items()}
    picked: dict[str, list] = {k: [] for k in OUTCOMES}
    for outcome, want in GALLERY_MIX:
        picked[outcome] = queues[outcome][:want]
    for outcome in FILL_ORDER:  # fill short groups
        while sum(map(len, picked.values())) < n and len(picked[outcome]) < len(queues[outcome]):
            picked[outcome].append(queues[outcome][len(picked[outcome])])
    picks = [{"task": k[0], "id": k[1], "outcome": o, "sft": sft[k], "mpo": mpo[k]}
             for o in OUTCOMES for k in picked[o]][:n]
    return picks, counts


def _option_text(reply: str, options: dict) -> str:
    """An MCQ letter reply with its option's text ("B (yellow)")."""
    letter = reply.strip().rstrip(".").upper()
    return f"{reply.strip()} ({options[letter]})" if letter in options else reply


def _thumbnail(folder: Path | None, image) -> Path | None:
    """The row's image, only when it lies inside its task's folder (as eval itself reads it)."""
    if folder is None or not isinstance(image, str):
        return None
    try:
        return resolve_inside(folder, image)
    except PathOutsideRootError:
        return None


def _card(pick: dict, folder: Path | None, row: dict) -> Card:
    options = row.get("options") if isinstance(row.get("options"), dict) else {}
    gold = row.get("answer", pick["sft"].get("answer"))
    gold = gold[0] if isinstance(gold, list) and gold else gold
    image = row.get("image")
    image = image[0] if isinstance(image, list) and image else image
    question = row.get("question") or "\n".join(
        line for line in str(pick["sft"].get("prompt", "")).splitlines() if line.strip() != "<image>")

    def answer(label: str, pred: dict) -> Answer:
        text = str(pred.get("prediction", ""))
        return Answer(label, _option_text(text, options) if options else text, bool(pred.get("correct")),
                      extracted=str(pred.get("extracted") or ""))

    detail = row.get("category") or row.get("sampling") or ""
    return Card(
        question=str(question),
        options=" · ".join(f"{k}. {v}" for k, v in options.items()),
        image=_thumbnail(folder, image),
        caption=f"{pick['task']}{' · ' + str(detail) if detail else ''}",
        tag=OUTCOMES[pick["outcome"]], tag_class=pick["outcome"],
        answers=[answer("after SFT", pick["sft"]), answer("after MPO", pick["mpo"]),
                 Answer("gold", _option_text(str(gold), options) if options else str(gold))],
    )


def _gallery_section(out_dir: Path) -> Section:
    title = "Held-out questions: answers after SFT and after MPO"
    picks, counts = gallery_picks(out_dir)
    if not picks:
        return _missing(title, "eval/sft/predictions.jsonl and eval/mpo/predictions.jsonl have no questions in common")
    tasks = _task_rows(out_dir)
    cards = []
    for p in picks:
        folder, rows = tasks.get(p["task"], (None, {}))
        cards.append(_card(p, folder, rows.get(p["id"], {})))
    total = sum(counts.values())
    text = (f"{len(cards)} of the {total} held-out questions as the models were asked them (MCQ by letter, "
            f"first option order), picked for a mix of outcomes. Over all {total}: "
            + ", ".join(f"{OUTCOMES[k]} {counts[k]}" for k in OUTCOMES) + ".")
    return Section(title, text=text, html=gallery_html(cards))


# ---------------------------------------------------------------- MPO

def _tail_mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(moving_mean(vals, smooth_window(len(vals)))[-1]) if vals else None


def _mpo_section(out_dir: Path, plots: Path) -> Section:
    title = "MPO: reward margin"
    rows = read_metrics(out_dir / "runs" / "mpo")
    plot = mpo_rewards_plot(rows, plots / "mpo_rewards.png")
    if plot is None:
        return _missing(title, "runs/mpo/metrics.jsonl has no rewards/margin")
    margin, acc = _tail_mean(rows, "rewards/margin"), _tail_mean(rows, "rewards/accuracy")
    text = ("MPO's implicit reward of a reply is beta x (its log-probability under the model - under the SFT "
            "model it started from). The margin is the chosen (right) reply's reward minus the rejected one's: "
            "above 0, training moved the model towards the right replies; reward accuracy is the share of pairs "
            f"where it did. Over the last steps: margin {_fmt(margin, 2)}, reward accuracy {_fmt(acc, 2)}.")
    return Section(title, text=text, images=[plot],
                   html='<p><a href="runs/mpo/report.html">the MPO run\'s report</a> (loss terms, throughput)</p>'
                   if (out_dir / "runs" / "mpo" / "report.html").is_file() else "")


# ---------------------------------------------------------------- Best-of-N

def best_of_n_results(out_dir: Path, where: Path | None = None) -> list[tuple[str, str, dict, str]]:
    """(eval folder name, task, results.json[task]["best_of_n"], the task's primary metric) for every
    task with Best-of-N results, from ``where`` (an eval folder or its results.json) or else from every
    eval/*/results.json of the demo."""
    if where is not None:
        files = [where if where.suffix == ".json" else where / "results.json"]
    else:
        files = sorted((out_dir / "eval").glob("*/results.json"))
    found = []
    for f in files:
        for task, res in _read_json(f).get("tasks", {}).items():
            bon = res.get("best_of_n") if isinstance(res, dict) else None
            if isinstance(bon, dict) and bon.get("ks") and isinstance(bon.get("curves"), dict):
                found.append((f.parent.name, task, bon, str(res.get("primary", "score"))))
    return found


def _best_of_n_section(out_dir: Path, where: Path | None, plots: Path) -> Section:
    title = "Best-of-N: accuracy vs N"
    found = best_of_n_results(out_dir, where)
    if not found:
        return _missing(title, f"no Best-of-N eval in this run (no {where or 'eval/*'}/results.json with best_of_n)")
    folders = {f for f, *_ in found}
    panels = [(f"{task} ({folder})" if len(folders) > 1 else task, bon["ks"], bon["curves"], metric.replace("_", " "))
              for folder, task, bon, metric in found]
    plot = curves_plot(panels, plots / "best_of_n.png", BEST_OF_N_STYLES, "N (candidates per question)",
                       "Best-of-N: the answer picked from N sampled replies")
    table = []
    for folder, task, bon, _ in found:
        for name, style in BEST_OF_N_STYLES.items():
            values = bon["curves"].get(name)
            if isinstance(values, list):
                row = {"task": task if len(folders) == 1 else f"{task} ({folder})", "pick": style["label"]}
                row.update({f"N={k}": _fmt(v) for k, v in zip(bon["ks"], values)})
                table.append(row)
    _, _, bon, _ = found[0]
    curves = set(bon["curves"])
    rules = ["majority vote: the answer most of the N give"]
    if "prm" in curves:
        rules.append(f"PRM: the process reward model (the critic) scores every reasoning step, "
                     f"the {bon.get('aggregate', '?')} of a reply's step scores ranks it")
    if "orm" in curves:
        rules.append("ORM: the critic's score of the whole reply")
    text = (f"Each question gets N replies sampled at temperature {bon.get('temperature', '?')}, "
            f"top-p {bon.get('top_p', '?')}; each rule picks one of the first N and the pick is scored. "
            "pass@N counts a question right if any of the N is: no rule can beat it. "
            + "; ".join(rules) + f". The eval's headline metrics use {bon.get('select', '?')}.")
    return Section(title, text=text, images=[plot] if plot else [], html=table_html(table))


def _critic_section(out_dir: Path) -> Section | None:
    """How the critic scores held-out solutions whose wrong steps are known (``vlmforge prm-score``)."""
    found = [m for m in map(_read_json, sorted((out_dir / "eval").glob("*/*manifest.json")))
             if m.get("stage") == "prm-score" and isinstance(m.get("labels"), dict)]
    if not found:
        return None
    lab = found[0]["labels"]
    thr = lab.get("threshold", 0.5)
    rows = [
        {"steps": f"all ({lab.get('steps', '?')})", "judged right": _fmt(lab.get("step_accuracy"))},
        {"steps": f"'+' (correct) steps ({lab.get('plus_steps', '?')})", "judged right": _fmt(lab.get("plus_accuracy"))},
        {"steps": f"'-' (wrong) steps ({lab.get('minus_steps', '?')})", "judged right": _fmt(lab.get("minus_accuracy"))},
        {"steps": f"first wrong step of a wrong solution ({lab.get('wrong_solutions', '?')})",
         "judged right": _fmt(lab.get("first_error_found"))},
    ]
    return Section("Critic: steps it flags in solutions with a known wrong step", table=rows, text=(
        f"The PRM scores every step of held-out worked solutions (world/eval/math_steps.jsonl) whose first wrong "
        f"step is known; a step counts as judged right when its P('+') is at least {thr} for a correct step and "
        f"below it for a wrong one. The last row: the first step it flags in a wrong solution is the first wrong one."))


# ---------------------------------------------------------------- curation

def curation_table(out_dir: Path) -> list[dict]:
    """Per kind of caption pair (clean, then each injected fault): how many were in the crawl, kept
    by the filter, dropped by the filter network or as unreadable, removed by dedup, and left."""
    gt = _find(_read_json(out_dir / "curate" / "filtered" / "manifest.json"), "ground_truth") or {}
    dd = _find(_read_json(out_dir / "curate" / "curated" / "manifest.json"), "ground_truth") or {}
    if not gt:
        return []
    world = _find(_read_json(out_dir / "world" / "manifest.json"), "captions") or {}
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
        return _missing(title, "the demo ran with --no-curate")
    rows = curation_table(out_dir)
    if not rows:
        return _missing(title, "curate/filtered/manifest.json has no ground_truth (curate filter ran without --ground-truth)")
    gt = _find(_read_json(out_dir / "curate" / "filtered" / "manifest.json"), "ground_truth") or {}
    dd = _find(_read_json(out_dir / "curate" / "curated" / "manifest.json"), "ground_truth") or {}
    text = (f"The world's crawl has faults injected on purpose (listed in world/captions/faults.jsonl). The filter "
            f"network found {gt.get('mismatched_removed', '?')} of {gt.get('mismatched', '?')} mismatched captions "
            f"(recall {_fmt(gt.get('mismatch_recall'), 2)}) and kept {_fmt(gt.get('clean_kept_frac'), 2)} of the clean "
            f"pairs; of what it dropped, {_fmt(gt.get('precision'), 2)} were mismatches and "
            f"{_fmt(gt.get('precision_any_fault'), 2)} any fault.")
    if dd:
        text += (f" Dedup removes exact copies (groups left with one copy: "
                 f"{dd.get('exact_duplicate_groups_with_one_copy_left', '?')}); a clean pair it removes is the "
                 f"original of a copy that was kept instead (which one survives is arbitrary); clean pairs lost "
                 f"otherwise: {dd.get('clean_removed', '?')}. Near duplicates stay: the world repeats scenes on purpose.")
    return Section(title, text=text, html=table_html(rows, total_last=rows[-1]["caption pair"] == "all faulty"))


def _packing_section(out_dir: Path) -> Section | None:
    fill = _read_json(out_dir / "packed" / "manifest.json").get("fill")
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
        return _missing(title, "no runs/*/metrics.jsonl")
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
        return _missing(title, "no stage timings")
    labels, seconds, kinds = zip(*rows)
    plot = timeline_plot(labels, seconds, kinds, plots / "timeline.png", "Seconds per stage")
    return Section(title, images=[plot] if plot else [])


def _stages_section(stage_rows: list[dict]) -> Section:
    title = "Stages (each is a command you can run yourself)"
    if not stage_rows:
        return _missing(title, "no stages recorded")
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
        _gallery_section(out_dir),
        _mpo_section(out_dir, plots),
        _best_of_n_section(out_dir, Path(best_of_n) if best_of_n is not None else None, plots),
        _critic_section(out_dir),
        _curation_section(out_dir, curated),
        _packing_section(out_dir),
        _training_section(out_dir, plots),
        _timeline_section(stage_rows, plots),
        _stages_section(stage_rows),
    ]
    summary: dict = {"size": size, "scores": rows, "stages": stage_rows}
    if curated:
        summary["curation"] = {
            "filter": _find(_read_json(out_dir / "curate" / "filtered" / "manifest.json"), "ground_truth"),
            "dedup": _find(_read_json(out_dir / "curate" / "curated" / "manifest.json"), "ground_truth"),
            "table": curation_table(out_dir)}
    fill = _read_json(out_dir / "packed" / "manifest.json").get("fill")
    if fill:
        summary["packing"] = fill
    write_json(out_dir / "demo_summary.json", summary)
    return build_report(out_dir, [s for s in sections if s is not None], title=f"vlmforge demo ({size})",
                        intro=_intro(stage_rows, size))
