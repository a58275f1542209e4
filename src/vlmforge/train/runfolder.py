"""What a run folder remembers about its run, so that rerunning the same command resumes the same
run and nothing else.

``run.json`` holds the settings that define the run: the model section, the optimizer, schedule
and batch sizes of the train section, the batching of the data (``data.*`` in pretraining,
``sft.*`` in SFT and PRM training, ``preference.*`` and the ``mpo`` section in MPO), the seed, the number of
processes, the weights it started from, and the fingerprints of its data folder and its
tokenizer. It is written when a new run starts. A rerun
that would resume a checkpoint compares its own settings with it before anything is written, and
refuses a change, listing each changed key with its old and new value. Settings that do not change
what is trained (logging, reports, checkpoint frequency, where the run folder is, the device and
parallelism flags) are not part of it.

``train.resume=false`` starts the run over in the same folder: the files a previous run wrote there
are removed first, so two runs' checkpoints, metrics and weights never mix.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vlmforge.config.recipe import Recipe, run_seed
from vlmforge.errors import UserError
from vlmforge.files import METRICS_FILE, prepare_out_dir, write_json

RUN_FILE = "run.json"
RUN_FILE_VERSION = 1
# Keys of the train section that do not change what is trained (the rest define the run).
HARMLESS_TRAIN_KEYS = frozenset({
    "run_dir", "resume", "data_path", "init_from",  # where things are (the data and weights are fingerprinted)
    "log_every", "progress_bar", "report", "tensorboard", "checkpoint_every", "keep_last",
    "device", "activation_checkpointing", "fsdp",  # the same update either way
    "loss_chunk_tokens", "fused_loss", "compile",  # the same loss by other kernels (tested equal)
    "skip_nonfinite_steps",  # a run stopped at a NaN step may be resumed with skipping on
    # live evaluation reads the model, never changes the update (RNG states saved and restored)
    "eval_every", "eval_points", "eval_tasks", "eval_limit", "eval_max_new_tokens",
})
HARMLESS_MODEL_KEYS = frozenset({"attn_backend", "trust_remote_code"})
# data.* (pretraining loader) and sft.* (SFT loader) keys that do not change the batches.
HARMLESS_DATA_KEYS = frozenset({"num_workers", "strict"})
HARMLESS_SFT_KEYS = frozenset({"sources", "index", "lengths", "check_images", "strict", "index_workers", "num_workers"})
HARMLESS_PREFERENCE_KEYS = frozenset({"sources", "index", "strict", "num_workers"})
# What a vlmforge run writes into its folder: removed when train.resume=false starts it over
# (reference/: MPO's precomputed reference log-probs, see vlmforge.train.reference).
RUN_OUTPUTS = ("checkpoints", "final", "tensorboard", "plots", METRICS_FILE, "report.html", "manifest.json",
               RUN_FILE, "config.yaml", "reference")


def _flat(prefix: str, node: Any, skip: frozenset = frozenset()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in skip:
            continue
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(_flat(name, value))
        else:
            out[name] = value
    return out


def run_settings(cfg: Recipe, world_size: int, fingerprints: dict[str, Any]) -> dict[str, Any]:
    """The settings that define a run, flat ``{"train.lr": 0.001, ...}``; ``fingerprints`` adds the
    data, tokenizer and starting weights (from :func:`vlmforge.train.stages.run_fingerprints`)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    out = {**_flat("train", c["train"], HARMLESS_TRAIN_KEYS), **_flat("model", c["model"], HARMLESS_MODEL_KEYS)}
    out.pop("train.seed", None)
    out["seed"] = run_seed(cfg)
    if cfg.train.stage in ("sft", "prm"):  # prm reads an SFT index too
        out.update(_flat("sft", c["sft"], HARMLESS_SFT_KEYS))
        if out.get("sft.image_root"):
            out["sft.image_root"] = os.path.abspath(out["sft.image_root"])
    elif cfg.train.stage == "mpo":
        out.update(_flat("preference", c["preference"], HARMLESS_PREFERENCE_KEYS))
        if out.get("preference.image_root"):
            out["preference.image_root"] = os.path.abspath(out["preference.image_root"])
        out.update(_flat("mpo", c["mpo"]))
    else:
        out.update(_flat("data", c["data"], HARMLESS_DATA_KEYS))
    out["world_size"] = int(world_size)
    out.update(fingerprints)
    return json.loads(json.dumps(out))  # as it reads back from run.json


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(ch in "0123456789abcdef" for ch in value):
        return value[:12]  # a sha256
    return json.dumps(value)


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each key recorded in both whose value differs (a key a newer
    vlmforge added is not a change)."""
    return [f"{k}: {_show(old[k])} -> {_show(new[k])}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").is_file()


def previous_outputs(run_dir: Path) -> list[Path]:
    return [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]


def check_run_folder(run_dir: str | Path, settings: dict[str, Any], resume: bool) -> str:
    """Read-only (every rank may call it): what accepting this run means for ``run_dir``.

    Returns ``"new"`` (nothing to resume), ``"resume"`` (a checkpoint whose run.json matches, or
    an older folder without run.json) or ``"restart"`` (train.resume=false over a previous run).
    Raises UserError, naming every changed key, when a resume would continue a run with other settings.
    """
    run_dir = Path(run_dir)
    if not resume:
        return "restart" if previous_outputs(run_dir) else "new"
    if not has_checkpoint(run_dir):
        return "new"
    path = run_dir / RUN_FILE
    if not path.is_file():
        return "resume"
    try:
        old = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a vlmforge run file ({e}); resume needs it: set train.resume=false "
                        "to start this run over, or use a new train.run_dir") from None
    changes = changed_settings(old, settings)
    if changes:
        lines = "\n  ".join(changes)
        raise UserError(
            f"{run_dir} holds a run with other settings, and resuming it would keep the old ones "
            f"({len(changes)} changed, recorded in {path}):\n  {lines}\n"
            f"resume with the recorded settings, or start over: --set train.resume=false (removes this run's "
            f"checkpoints, metrics and final/ from {run_dir}) or --set train.run_dir=NEW_FOLDER"
        )
    return "resume"


def accept_run(run_dir: str | Path, settings: dict[str, Any], decision: str, info: dict[str, Any]) -> None:
    """Main rank, after :func:`check_run_folder` accepted the run on every rank: clear a previous
    run (``restart``) and write run.json for a new run (kept as it is on a resume). A run_dir that is
    a file, or cannot be created or written, is refused as one line naming train.run_dir."""
    run_dir = Path(run_dir)
    prepare_out_dir(run_dir, resumable=True, flag="train.run_dir")
    if decision == "restart":
        gone = previous_outputs(run_dir)
        for p in gone:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        print(f"train.resume=false: starting over in {run_dir} (removed the previous run's "
              f"{', '.join(p.name for p in gone)})", flush=True)
    path = run_dir / RUN_FILE
    if decision == "resume":
        if path.is_file():
            return
        warnings.warn(f"{run_dir} has no {RUN_FILE} (an older vlmforge wrote it): its settings cannot be "
                      "compared; resuming with the current ones and recording them", stacklevel=2)
    write_json(path, {"version": RUN_FILE_VERSION, "settings": settings, "info": info})
