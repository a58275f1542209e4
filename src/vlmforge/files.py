"""Small file helpers every stage uses: numbered line reading, atomic writes and the stage manifest."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from vlmforge import __version__

# A run folder's per-step log, one json object per optimizer step (written by the trainer).
METRICS_FILE = "metrics.jsonl"


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """("FILE:LINE", text) for every non-blank line, so a reader's errors can name the exact line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{n}", line


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file + rename so a killed process never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_manifest(
    out_dir: str | os.PathLike,
    stage: str,
    *,
    inputs: Any = None,
    config: Any = None,
    counts: dict | None = None,
    dropped: dict | None = None,
    **extra: Any,
) -> Path:
    """Every stage writes ``manifest.json``: inputs, config, counts, what was dropped and why."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    manifest = {
        "stage": stage,
        "vlmforge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "inputs": inputs,
        "counts": counts or {},
        "dropped": dropped or {},
        **extra,
        "config": config,
    }
    path = Path(out_dir) / "manifest.json"
    write_json(path, manifest)
    return path


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run folder's metrics.jsonl ([] when there is none yet)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return rows
