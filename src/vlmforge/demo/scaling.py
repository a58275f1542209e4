"""The demo report's test-time scaling sections: Best-of-N curves per picking rule and the critic's
verdicts on held-out solutions with a known wrong step."""

from __future__ import annotations

from pathlib import Path

from vlmforge.demo.report_common import fmt, missing, read_json
from vlmforge.report.builder import Section, table_html
from vlmforge.report.plots import (
    curves_plot,
)

# Best-of-N curves (contract C3) in legend order, with how they are drawn.
BEST_OF_N_STYLES = {
    "pass": {"label": "pass@N: any of the N right (the ceiling)", "color": "k", "linestyle": "--"},
    "prm": {"label": "PRM picks (critic's step scores)", "color": "C3"},
    "orm": {"label": "ORM picks (critic's whole-reply score)", "color": "C1"},
    "majority": {"label": "majority vote over the N answers", "color": "C0"},
    "first": {"label": "first sample (no selection)", "color": "C7", "linestyle": ":"},
}


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
        for task, res in read_json(f).get("tasks", {}).items():
            bon = res.get("best_of_n") if isinstance(res, dict) else None
            if isinstance(bon, dict) and bon.get("ks") and isinstance(bon.get("curves"), dict):
                found.append((f.parent.name, task, bon, str(res.get("primary", "score"))))
    return found


def best_of_n_section(out_dir: Path, where: Path | None, plots: Path) -> Section:
    title = "Best-of-N: accuracy vs N"
    found = best_of_n_results(out_dir, where)
    if not found:
        return missing(title, f"no Best-of-N eval in this run (no {where or 'eval/*'}/results.json with best_of_n)")
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
                row.update({f"N={k}": fmt(v) for k, v in zip(bon["ks"], values)})
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


def critic_section(out_dir: Path) -> Section | None:
    """How the critic scores held-out solutions whose wrong steps are known (``vlmforge prm-score``)."""
    found = [m for m in map(read_json, sorted((out_dir / "eval").glob("*/*manifest.json")))
             if m.get("stage") == "prm-score" and isinstance(m.get("labels"), dict)]
    if not found:
        return None
    lab = found[0]["labels"]
    thr = lab.get("threshold", 0.5)
    rows = [
        {"steps": f"all ({lab.get('steps', '?')})", "judged right": fmt(lab.get("step_accuracy"))},
        {"steps": f"'+' (correct) steps ({lab.get('plus_steps', '?')})", "judged right": fmt(lab.get("plus_accuracy"))},
        {"steps": f"'-' (wrong) steps ({lab.get('minus_steps', '?')})", "judged right": fmt(lab.get("minus_accuracy"))},
        {"steps": f"first wrong step of a wrong solution ({lab.get('wrong_solutions', '?')})",
         "judged right": fmt(lab.get("first_error_found"))},
    ]
    return Section("Critic: steps it flags in solutions with a known wrong step", table=rows, text=(
        f"The PRM scores every step of held-out worked solutions (world/eval/math_steps.jsonl) whose first wrong "
        f"step is known; a step counts as judged right when its P('+') is at least {thr} for a correct step and "
        f"below it for a wrong one. The last row: the first step it flags in a wrong solution is the first wrong one."))
