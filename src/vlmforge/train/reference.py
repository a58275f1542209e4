"""The MPO reference model's log-probabilities, with one model in memory or two.

``precompute`` (default): before the first step, the initial model (eval mode, no gradients) runs
once over every preference pair (``loader.reference_batches``, sharded over ranks) and the summed
log-probs of each pair's chosen and rejected response go to ``<run_dir>/reference/``:

    reference.json          what they were computed from (key) and whether they are complete
    logps.safetensors       pair_ids [N] (index record numbers), logps [N, 2] fp32 (chosen, rejected)
    part-*.safetensors      finished work of an unfinished precompute (merged, then removed)

A killed precompute continues where its finished parts end; a cache computed from other data or
another initial checkpoint is refused. Training looks the values up by ``batch["pair_ids"]``.

``live``: a frozen copy of the initial model next to the policy (sharded like it under FSDP2),
run under no_grad on every micro-batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from vlmforge import dist as vdist
from vlmforge.config.train import TrainConfig
from vlmforge.errors import UserError
from vlmforge.files import atomic_write_text
from vlmforge.train.parallel import place_model

REFERENCE_DIR = "reference"
KEY_FILE = "reference.json"
LOGPS_FILE = "logps.safetensors"
PART_PAIRS = 4096  # pairs per part file: a killed precompute redoes at most this many per rank


def checkpoint_fingerprint(ckpt_dir: str | os.PathLike) -> str:
    """sha256 of the checkpoint's model.safetensors size and mtime and of its config.yaml.

    Hashing the weights themselves would read every byte (many GB for a real model) at every
    start. A rewritten checkpoint gets a new mtime (save_vlm replaces the file), another recipe a
    new config.yaml; a copy that keeps times (cp -p, rsync -a) keeps the fingerprint, as it should.
    """
    ckpt = Path(ckpt_dir)
    st = (ckpt / "model.safetensors").stat()
    h = hashlib.sha256(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update((ckpt / "config.yaml").read_bytes())
    return h.hexdigest()


def _pair_table(pair_ids: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """[max_id + 1, 2] fp64 (the policy's sums are fp64 too), NaN where no pair has that id."""
    size = int(pair_ids.max()) + 1 if pair_ids.numel() else 0
    table = torch.full((size, 2), float("nan"), dtype=torch.float64)
    table[pair_ids] = logps.double()
    return table


class PrecomputedReference:
    """Reference log-prob sums looked up by pair id."""

    def __init__(self, pair_ids: torch.Tensor, logps: torch.Tensor) -> None:
        self.num_pairs = int(pair_ids.numel())
        self.table = _pair_table(pair_ids.long(), logps)

    def pair_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["pair_ids"]
        if self.table.device != ids.device:
            self.table = self.table.to(ids.device)
        n = self.table.shape[0]
        if n == 0:
            raise UserError(f"no precomputed reference log-probs for pair ids {ids.tolist()[:8]}; remove the run's "
                            "reference/ folder to compute them again")
        out = self.table[ids.clamp(0, n - 1)]
        known = (ids >= 0) & (ids < n) & ~torch.isnan(out).any(dim=1)
        if not bool(known.all()):
            raise UserError(f"pair ids {ids[~known].tolist()[:8]} have no precomputed reference log-probs "
                            f"({self.num_pairs} pairs stored); remove the run's reference/ folder to compute them again")
        return out


class LiveReference:
    """A frozen deep copy of the initial model (eval mode), placed and sharded like the policy; the
    objective runs it under no_grad."""

    def __init__(self, model: nn.Module, tcfg: TrainConfig, device: torch.device, world_size: int) -> None:
        frozen = copy.deepcopy(model)
        frozen.requires_grad_(False)
        self.model, self.place = place_model(frozen, tcfg, device, world_size)
        self.model.eval()


# ---------------------------------------------------------------- precompute


def _describe(key: dict[str, Any], what: str) -> str:
    part = key.get(what, {})
    return f"{part.get('path')} (fingerprint {str(part.get('fingerprint'))[:12]})"


def check_key(folder: Path, recorded: dict[str, Any], key: dict[str, Any]) -> None:
    """UserError (one line, naming data and initial checkpoint on both sides) if the cache in
    ``folder`` was computed from other data, another initial checkpoint or other model settings."""
    old = recorded.get("key", {})
    same = all(old.get(k, {}).get("fingerprint") == key[k]["fingerprint"] for k in ("data", "init"))
    if same and old.get("model") == key.get("model"):
        return
    settings = "" if old.get("model") == key.get("model") else (
        f" and model settings {old.get('model')} (now {key.get('model')})")
    raise UserError(
        f"{folder} holds reference log-probs of preference index {_describe(old, 'data')} and initial checkpoint "
        f"{_describe(old, 'init')}{settings}, but this run uses {_describe(key, 'data')} and "
        f"{_describe(key, 'init')}: remove {folder} to recompute them (or set train.resume=false to start the run over)"
    )


def _read_key(folder: Path) -> dict[str, Any] | None:
    path = folder / KEY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not a reference key file ({e}); remove {folder} to recompute") from None


def _write_key(folder: Path, key: dict[str, Any], complete: bool, **counts: int) -> None:
    body = {"key": key, "complete": complete, **counts}
    atomic_write_text(folder / KEY_FILE, json.dumps(body, indent=2) + "\n")


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.safetensors"))


def _done_pairs(folder: Path) -> set[int]:
    done: set[int] = set()
    for p in _parts(folder):
        done.update(load_file(str(p))["pair_ids"].tolist())
    return done


def _write_part(folder: Path, ids: list[torch.Tensor], logps: list[torch.Tensor]) -> None:
    pair_ids = torch.cat(ids).long().contiguous()
    values = torch.cat(logps).double().contiguous()
    name = f"part-{vdist.rank():05d}-{int(pair_ids[0]):010d}-{pair_ids.numel()}.safetensors"
    tmp = folder / f".{name}.tmp"
    save_file({"pair_ids": pair_ids, "logps": values}, str(tmp))
    os.replace(tmp, folder / name)


def _compute_missing(folder: Path, batches, pair_logps_fn: Callable[[dict], torch.Tensor], device: torch.device,
                     part_pairs: int, progress: bool) -> int:
    """Run the model over every batch holding a pair without a finished part; returns the pairs
    computed. Under several ranks the forward passes are collective (FSDP), so every rank runs one
    whenever any rank has work, on a batch of its own whose result it discards if need be."""
    done = _done_pairs(folder)
    world = vdist.world_size()
    it = iter(batches)
    ids: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    last = None
    computed = 0
    bar = tqdm(desc="reference log-probs", unit="pair", disable=not (progress and vdist.is_main()), dynamic_ncols=True)
    with torch.no_grad():
        while True:
            batch = next(it, None)
            todo = batch is not None and any(int(i) not in done for i in batch["pair_ids"].tolist())
            if batch is not None:
                last = batch
            if world > 1:
                flags = torch.tensor([float(batch is not None), float(todo)], dtype=torch.float64, device=device)
                vdist.all_reduce_sum(flags)
                if flags[0] == 0:
                    break
                if flags[1] == 0:
                    continue
                if not todo:
                    stand_in = batch if batch is not None else last
                    if stand_in is None:
                        raise UserError("a rank has no preference pair to compute reference log-probs on "
                                        "(fewer pairs than ranks)")
                    pair_logps_fn(stand_in)
                    continue
            elif batch is None:
                break
            elif not todo:
                continue
            out = pair_logps_fn(batch).detach().double().cpu()
            ids.append(batch["pair_ids"].cpu())
            values.append(out)
            computed += int(out.shape[0])
            bar.update(int(out.shape[0]))
            if sum(int(t.numel()) for t in ids) >= part_pairs:
                _write_part(folder, ids, values)
                ids, values = [], []
    if ids:
        _write_part(folder, ids, values)
    bar.close()
    return computed


def _merge(folder: Path, num_pairs: int, unloadable: int) -> None:
    """Main rank: every part into logps.safetensors (sorted by pair id). ``unloadable``: pairs the
    loader skipped (an image gone), which training skips too."""
    found: dict[int, torch.Tensor] = {}
    for p in _parts(folder):
        part = load_file(str(p))
        for i, row in zip(part["pair_ids"].tolist(), part["logps"]):
            found.setdefault(int(i), row)
    if len(found) + unloadable != num_pairs:
        raise UserError(f"{folder}: the reference precompute covered {len(found)} of {num_pairs} pairs "
                        f"({unloadable} could not be loaded); remove {folder} to compute them again")
    order = sorted(found)
    pair_ids = torch.tensor(order, dtype=torch.long)
    logps = torch.stack([found[i] for i in order]).double().contiguous() if order else torch.zeros(0, 2, dtype=torch.float64)
    tmp = folder / f".{LOGPS_FILE}.tmp"
    save_file({"pair_ids": pair_ids, "logps": logps}, str(tmp))
    os.replace(tmp, folder / LOGPS_FILE)


def load_or_precompute(
    run_dir: str | os.PathLike,
    key: dict[str, Any],
    loader,
    batch_size: int,
    pair_logps_fn: Callable[[dict], torch.Tensor],
    device: torch.device,
    part_pairs: int = PART_PAIRS,
    progress: bool = True,
) -> PrecomputedReference:
    """Collective. The reference log-probs of every pair of ``loader`` (``reference_batches``),
    from ``<run_dir>/reference`` when complete and computed from ``key``, else computed (the parts
    a killed run finished are kept). ``key``: {"data": {path, fingerprint}, "init": {path,
    fingerprint}, "model": {...}}. ``pair_logps_fn(batch)`` -> [P, 2] with the initial model."""
    folder = Path(run_dir) / REFERENCE_DIR
    recorded = _read_key(folder)
    if recorded is not None:
        check_key(folder, recorded, key)
    if not (recorded and recorded.get("complete")):
        vdist.barrier()  # every rank has read the key before the main rank writes it
        if vdist.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            if recorded is None:
                _write_key(folder, key, complete=False)
        vdist.barrier()
        _compute_missing(folder, loader.reference_batches(batch_size), pair_logps_fn, device, part_pairs, progress)
        unloadable = torch.tensor(float(sum(getattr(loader, "reference_skipped", {}).values())),
                                  dtype=torch.float64, device=device)
        vdist.all_reduce_sum(unloadable)  # also the barrier after every rank's last part
        failed, problem = torch.zeros((), dtype=torch.float64, device=device), ""
        if vdist.is_main():
            num = int(loader.num_pairs)
            try:
                _merge(folder, num, int(unloadable))
            except UserError as e:
                failed += 1
                problem = str(e)
            else:
                _write_key(folder, key, complete=True, num_pairs=num, unloadable=int(unloadable))
                for p in _parts(folder):
                    p.unlink()
        vdist.all_reduce_sum(failed)  # every rank stops together (no rank left waiting at a barrier)
        if float(failed) > 0:
            raise UserError(problem or f"{folder}: the reference precompute is incomplete (see rank 0's message)")
    stored = load_file(str(folder / LOGPS_FILE))
    return PrecomputedReference(stored["pair_ids"], stored["logps"])
