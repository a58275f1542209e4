"""Evaluation: tasks (jsonl / parquet / VLMEvalKit TSV), one module per kind (``kinds/``), k-shot, runner.

``evaluate(model, tokenizer, tasks, ...)`` is the Python entry point (see ``runner``);
``vlmforge eval`` the command. Names are imported lazily so that ``vlmforge --help`` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "runner", "evaluate_task": "runner", "headline": "runner", "summary_table": "runner",
    "EvalItem": "items", "ImageRef": "items", "TaskError": "items", "Task": "tasks", "load_task": "tasks",
    "TaskSpec": "specs", "parse_task_specs": "specs", "KINDS": "kinds", "get_kind": "kinds",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vlmforge.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlmforge.eval' has no attribute {name!r}")
