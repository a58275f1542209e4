"""The HTML run report: a summary table, the training plots, and sections other stages add."""

from __future__ import annotations

import base64
import html
import json
import mimetypes
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from vlmforge.files import atomic_write_text, read_metrics
from vlmforge.report.plots import eval_curves_plot, is_eval_row, is_score, training_plots

REPORT = "report.html"
PLOTS_DIR = "plots"


@dataclass
class Section:
    """A block of the report. ``images`` are paths (embedded in the page, linked when inside the
    run folder); ``table`` is a list of rows (dicts, same keys); ``html`` is trusted markup;
    ``note`` says why a section has nothing to show."""

    title: str
    text: str = ""
    note: str = ""
    table: list[dict] | None = None
    images: list[str | os.PathLike] = field(default_factory=list)
    html: str = ""


NUMBER = re.compile(r"[+-]?\d+(\.\d+)?(e[+-]?\d+)?%?")


def cell_html(v) -> str:
    """A table cell; numbers (and numbers already formatted as text) align right."""
    if isinstance(v, bool) or v is None:
        return f"<td>{'' if v is None else v}</td>"
    if isinstance(v, float):
        return f'<td class="num">{v:.6g}</td>'
    if isinstance(v, int) or NUMBER.fullmatch(str(v)):
        return f'<td class="num">{html.escape(str(v))}</td>'
    return f"<td>{html.escape(str(v))}</td>"


def table_html(rows: Sequence[dict], total_last: bool = False) -> str:
    """Rows (dicts) as a table, columns in first-seen order; ``total_last``: the last row is a total."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for i, r in enumerate(rows):
        cls = ' class="total"' if total_last and i == len(rows) - 1 else ""
        body.append(f"<tr{cls}>" + "".join(cell_html(r.get(c, "")) for c in cols) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _inside(path: str | os.PathLike, base: Path) -> str | None:
    """``path`` relative to ``base`` (posix), or None when it lies outside."""
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return None


def data_uri(path: str | os.PathLike) -> str:
    """The file as a data: URI, so the page shows it offline and after being moved alone."""
    p = Path(path)
    mime = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode('ascii')}"


def _image_html(img: str | os.PathLike, base: Path) -> str:
    tag = f'<img src="{data_uri(img)}" alt="{html.escape(Path(img).stem)}">'
    rel = _inside(img, base)  # a link to the PNG file itself, when it sits in the report's folder
    return f'<a href="{html.escape(rel)}">{tag}</a>' if rel else tag


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def _section_html(sec: Section, base: Path, anchor: str) -> str:
    parts = [f'<h2 id="{anchor}">{html.escape(sec.title)}</h2>']
    if sec.text:
        parts.append(f"<p>{html.escape(sec.text)}</p>")
    if sec.note:
        parts.append(f'<p class="note">{html.escape(sec.note)}</p>')
    if sec.table:
        parts.append(table_html(sec.table))
    parts.extend(_image_html(img, base) for img in sec.images if Path(img).is_file())
    if sec.html:
        parts.append(sec.html)
    return "<section>" + "\n".join(parts) + "</section>"


def _contents(sections: Sequence[Section], anchors: Sequence[str]) -> str:
    items = "".join(f'<li><a href="#{a}">{html.escape(s.title)}</a></li>' for s, a in zip(sections, anchors))
    return f'<nav><ol>{items}</ol></nav>'


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Headline numbers of a training run from its metrics rows."""
    if not rows:
        return []
    last = rows[-1]
    n = len(rows)
    tail = rows[n // 2 :] if n > 1 else rows  # steady state: skip warm-up steps

    def mean(key, rs=tail):
        vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    wait, step = mean("data_wait"), mean("step_time")
    out = {
        "steps": last.get("step"),
        "first loss": rows[0].get("loss"),
        "last loss": last.get("loss"),
        "real tokens/s (2nd half mean)": mean("tokens_per_s"),
        "real token fraction": mean("real_token_fraction", rows),
        "step time s (2nd half mean)": step,
        "data wait fraction": (wait / step) if wait is not None and step else None,
    }
    return [{"metric": k, "value": v} for k, v in out.items() if v is not None]


def eval_table(rows: Sequence[dict]) -> list[dict]:
    """The live evaluations as a table: one row per overall score of a task, one column per
    evaluation (its samples seen); per-category breakdowns and counts are in the plot and in
    metrics.jsonl."""
    evals = [r for r in rows if is_eval_row(r)]
    table: dict[str, dict] = {}
    for r in evals:
        column = f"{r.get('samples_seen')} seen"
        for k, v in r.items():
            task, _, metric = k[len("eval/"):].partition("/") if k.startswith("eval/") else ("", "", "")
            if metric and "/" not in metric and is_score(metric, [v]):
                table.setdefault(f"{task} {metric}", {"score": f"{task} {metric}"})[column] = round(float(v), 3)
    return list(table.values())

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 64em; padding: 0 1em; color: #222;
       line-height: 1.45; }
h1 { margin-bottom: .2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .15em; margin-top: 1.6em; }
img { max-width: 100%; border: 1px solid #ddd; margin: .3em 0; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: left; font-size: 90%; vertical-align: top; }
th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.total td { font-weight: 600; border-top: 2px solid #999; }
td:first-child { white-space: nowrap; }
code { font-size: 85%; overflow-wrap: anywhere; }
section { margin-bottom: 1.5em; }
nav ol { columns: 2; font-size: 95%; }
p.note { color: #666; font-style: italic; }
.lead { font-size: 105%; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(14.5em, 1fr)); gap: .8em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em; font-size: 88%; background: #fff; }
.card img.thumb { width: 128px; height: 128px; image-rendering: pixelated; display: block; margin: 0 auto .4em; }
.card .tag { display: inline-block; border-radius: 3px; padding: 0 .4em; font-size: 85%; color: #fff; }
.card .q { font-weight: 600; margin: .3em 0; }
.card .opts { color: #555; }
.card dl { display: grid; grid-template-columns: auto 1fr; gap: .1em .5em; margin: .3em 0 0; }
.card dt { color: #555; }
.card dd { margin: 0; overflow-wrap: anywhere; }
.card .reply { white-space: pre-wrap; color: #444; font-size: 95%; }
.ok { color: #1a7f37; } .bad { color: #c62828; }
.tag.fixed { background: #1a7f37; } .tag.broke { background: #c62828; } .tag.right { background: #5470c6; }
.tag.wrong { background: #777; }
"""


def build_report(
    run_dir: str | os.PathLike,
    extra_sections: Sequence[Section] = (),
    title: str | None = None,
    intro: str = "",
) -> Path:
    """Write ``<run_dir>/plots/*.png`` and ``<run_dir>/report.html`` (one self-contained page:
    images are embedded); returns the HTML path. ``intro`` is trusted markup under the title."""
    run = Path(run_dir)
    rows = read_metrics(run)
    steps = [r for r in rows if not is_eval_row(r)]
    sections: list[Section] = []
    if steps:
        sections.append(Section("Summary", table=summarize(steps)))
        for plot_title, path in training_plots(steps, run / PLOTS_DIR):
            sections.append(Section(plot_title, images=[path]))
    curves = eval_curves_plot(rows, run / PLOTS_DIR / "eval.png")
    if curves is not None:
        sections.append(Section(
            "Benchmarks vs samples seen", images=[curves],
            text="The train.eval_tasks scores of the live model (train.eval_every), against the training samples "
                 "(conversations, captions or pairs) seen so far; the first point is the model training started from.",
            table=eval_table(rows)))
    sections.extend(extra_sections)
    manifest = run / "manifest.json"
    cfg_link = '<a href="config.yaml">config.yaml</a>' if (run / "config.yaml").is_file() else ""
    links = " · ".join(
        x
        for x in (
            cfg_link,
            '<a href="metrics.jsonl">metrics.jsonl</a>' if rows else "",
            '<a href="manifest.json">manifest.json</a>' if manifest.is_file() else "",
        )
        if x
    )
    name = title or f"vlmforge run: {run.name}"
    stage = ""
    if manifest.is_file():
        try:
            stage = json.loads(manifest.read_text()).get("stage", "")
        except (json.JSONDecodeError, OSError):
            stage = ""
    anchors = [f"s{i}-{slug(s.title)}" for i, s in enumerate(sections, 1)]
    body = "\n".join(_section_html(s, run, a) for s, a in zip(sections, anchors)) or "<p>No metrics yet.</p>"
    contents = _contents(sections, anchors) if len(sections) >= 6 else ""
    head = f"<p>{html.escape(stage)} {links}</p>" if stage or links else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(name)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(name)}</h1>
{head}
{intro}
{contents}
{body}
</body></html>
"""
    out = run / REPORT
    atomic_write_text(out, page)
    return out
