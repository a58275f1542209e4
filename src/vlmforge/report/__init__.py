"""Run reports: metrics.jsonl -> PNG plots + one HTML page.

``build_report(run_dir, extra_sections=[Section(...)])``: training writes the loss / lr /
throughput plots; other stages (eval, the demo) add their own sections (tables, images, text).
"""

from vlmforge.report.builder import Section, build_report
from vlmforge.report.plots import plot_series

__all__ = ["Section", "build_report", "plot_series"]
