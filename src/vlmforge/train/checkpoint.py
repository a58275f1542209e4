"""Resumable checkpoints through torch.distributed.checkpoint, without pickle.

Layout of ``<run_dir>/checkpoints/``::

    step_00000100/
        *.safetensors        model + optimizer tensors (DCP, HuggingFace safetensors storage;
                             every rank writes its own shards, loads reshard)
        trainer_state.json   step, scheduler, counters (rank 0)
        rank_00000.json      this rank's data-loader position and RNG states
    latest                   name of the newest complete checkpoint (replaced atomically)

A checkpoint is written into a hidden temporary folder and renamed when every rank is done, and
only then does ``latest`` move: a run killed at any moment (SIGKILL included) finds either the
previous or the new checkpoint, never half of one. Only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from vlmforge import dist as vdist
from vlmforge.errors import ConfigError
from vlmforge.files import atomic_write_text, write_json
from vlmforge.train.optim import torch_optimizers

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_name(rank: int) -> str:
    return f"rank_{rank:05d}.json"


# ---------------------------------------------------------------- RNG states (json-able)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---------------------------------------------------------------- model + optimizer tensors


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call that it runs without a process group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} for parameters registered under several names (tied embeddings):
    safetensors refuses shared storage, so only the canonical name is stored."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _flat_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Model and optimizer state as one flat {name: tensor} dict (FQN keys, DTensors when sharded)."""
    msd, osd = get_state_dict(model, torch_optimizers(optimizer))
    aliases = tied_aliases(model)
    flat = {f"model.{k}": v for k, v in msd.items() if k not in aliases}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                v = torch.tensor(v)
            flat[f"optim.{fqn}.{k}"] = v
    return flat, osd


def _unflatten(flat: dict[str, torch.Tensor], osd: dict, aliases: dict[str, str]) -> tuple[dict, dict]:
    msd = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
    for alias, canonical in aliases.items():
        msd[alias] = msd[canonical]
    state: dict[str, dict] = {}
    for fqn, st in osd["state"].items():
        state[fqn] = {k: flat[f"optim.{fqn}.{k}"] for k in st}
    return msd, {"state": state, "param_groups": osd["param_groups"]}


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    root = Path(ckpt_root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not (target / TRAINER_STATE).is_file():
        raise RuntimeError(f"{pointer} names {target}, which is not a complete checkpoint")
    return target


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    rank_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Collective: every rank calls it. ``rank_state`` (data-loader position) is per rank."""
    root = Path(ckpt_root)
    name = step_dir_name(step)
    final = root / name
    tmp = root / f".{name}.tmp"
    if vdist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    vdist.barrier()
    flat, _ = _flat_state(model, optimizer)
    distributed = vdist.world_size() > 1
    with _quiet_single_process():
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=distributed))
    write_json(tmp / rank_state_name(vdist.rank()), {**rank_state, "rng": capture_rng()})
    vdist.barrier()
    if vdist.is_main():
        write_json(
            tmp / TRAINER_STATE,
            {**trainer_state, "step": step, "world_size": vdist.world_size(), "scheduler": scheduler.state_dict()},
        )
        if final.exists():  # a re-save of the same step (resumed right after saving it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, name + "\n")
        _prune(root, keep_last, keep=name)
    vdist.barrier()
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[: max(0, len(steps) - max(1, keep_last))]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(
    ckpt_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective. Restores model, optimizer, scheduler (and its lrs) and this rank's RNG;
    returns (trainer_state, rank_state) for the loop to restore its counters and data position."""
    ckpt = Path(ckpt_dir)
    trainer_state = json.loads((ckpt / TRAINER_STATE).read_text())
    if trainer_state.get("world_size") != vdist.world_size():
        # the tensors reshard fine, but each rank's data-loader position belongs to one rank layout
        raise ConfigError(
            f"{ckpt} was written by {trainer_state.get('world_size')} process(es); "
            f"resume it with the same number (now {vdist.world_size()}), or set train.resume=false / a new train.run_dir"
        )
    rank_file = ckpt / rank_state_name(vdist.rank())
    rank_state = json.loads(rank_file.read_text())
    flat, osd = _flat_state(model, optimizer)  # allocates optimizer state to load into
    with _quiet_single_process():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(ckpt)))
    msd, osd = _unflatten(flat, osd, tied_aliases(model))
    set_state_dict(model, torch_optimizers(optimizer), model_state_dict=msd, optim_state_dict=osd)
    scheduler.load_state_dict(trainer_state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    restore_rng(rank_state.pop("rng"))
    return trainer_state, rank_state


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 CPU weights (collective; every rank gets them, rank 0 writes)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=vdist.world_size() > 1)
    sd = get_model_state_dict(model, options=opts)
    return {k: v.detach().to("cpu") for k, v in sd.items()}
