"""The HTML run report: a summary table, the training plots, and sections other stages add."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from vlmforge.files import atomic_write_text, read_metrics
from vlmforge.report.plots import training_plots

REPORT = "report.html"
PLOTS_DIR = "plots"


@dataclass
class Section:
    """A block of the report. ``images`` are paths (copied links, relative to the run folder when
    inside it); ``table`` is a list of rows (dicts, same keys); ``html`` is trusted markup."""

    title: str
    text: str = ""
    table: list[dict] | None = None
    images: list[str | os.PathLike] = field(default_factory=list)
    html: str = ""


def _table(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, float):
            v = f"{v:.6g}"
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(cell(r.get(c, "")) for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _rel(path: str | os.PathLike, base: Path) -> str:
    p = Path(path)
    try:
        return p.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return p.resolve().as_uri()


def _section_html(sec: Section, base: Path) -> str:
    parts = [f"<h2>{html.escape(sec.title)}</h2>"]
    if sec.text:
        parts.append(f"<p>{html.escape(sec.text)}</p>")
    if sec.table:
        parts.append(_table(sec.table))
    for img in sec.images:
        rel = _rel(img, base)
        parts.append(f'<a href="{html.escape(rel)}"><img src="{html.escape(rel)}" alt="{html.escape(Path(img).stem)}"></a>')
    if sec.html:
        parts.append(sec.html)
    return "<section>" + "\n".join(parts) + "</section>"


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


def build_report(
    run_dir: str | os.PathLike,
    extra_sections: Sequence[Section] = (),
    title: str | None = None,
) -> Path:
    """Write ``<run_dir>/plots/*.png`` and ``<run_dir>/report.html``; returns the HTML path."""
    run = Path(run_dir)
    rows = read_metrics(run)
    sections: list[Section] = []
    if rows:
        sections.append(Section("Summary", table=summarize(rows)))
        for plot_title, path in training_plots(rows, run / PLOTS_DIR):
            sections.append(Section(plot_title, images=[path]))
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
    body = "\n".join(_section_html(s, run) for s in sections) or "<p>No metrics yet.</p>"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; margin: .3em 0; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
td, th {{ border: 1px solid #ccc; padding: .2em .6em; text-align: left; font-size: 90%; }}
section {{ margin-bottom: 1.5em; }}
</style></head><body>
<h1>{html.escape(name)}</h1>
<p>{html.escape(stage)} {links}</p>
{body}
</body></html>
"""
    out = run / REPORT
    atomic_write_text(out, page)
    return out
