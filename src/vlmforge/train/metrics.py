"""Per-step metrics: metrics.jsonl (one json object per optimizer step), TensorBoard events and a
tqdm progress bar. Only rank 0 writes. On resume the jsonl is cut back to the resumed step so it
holds exactly one line per step, plus one line per live evaluation (``train.eval_every``): its
step, ``samples_seen`` and ``eval/<task>/<metric>`` scores, and no ``loss``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from vlmforge.files import METRICS_FILE, atomic_write_text, read_metrics


def truncate_metrics(run_dir: str | os.PathLike, last_step: int) -> None:
    """Keep only rows with step <= last_step (the steps a resumed run will not redo)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        progress_bar: bool = True,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.run_dir, start_step)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": row["step"], "time": round(time.time(), 3), **{k: v for k, v in row.items() if k != "step"}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}",
                                  **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))

    def log_eval(self, row: dict[str, Any]) -> None:
        """A live evaluation's row: written and sent to TensorBoard (against the step), one line
        printed; the progress bar does not advance."""
        if not self.enabled:
            return
        row = {"step": row["step"], "time": round(time.time(), 3), **{k: v for k, v in row.items() if k != "step"}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scores = {k: v for k, v in row.items() if k.startswith("eval/")}
        if self._tb is not None:
            for k, v in scores.items():
                # against the step only: a resumed writer purges events from its start step on, in
                # every tag, which would drop a samples-seen axis's earlier points (the report plots that)
                self._tb.add_scalar(k, v, row["step"])
        text = ", ".join(f"{k[len('eval/'):]} {v:.3f}" for k, v in scores.items())
        line = f"eval at step {row['step']} ({row['samples_seen']} samples seen, {row['eval_seconds']:.1f}s): {text}"
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        self._file = self._tb = self._bar = None
