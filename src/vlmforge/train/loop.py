"""The one training loop. A stage (pretrain, sft) differs only in the data, objective settings and
freeze policy it hands in; this file knows nothing about where batches come from.

One optimizer step = ``accum`` micro-batches per rank. The step's micro-batches are fetched
first, so the objective's global denominators (next-token: the weight sum W; MPO: the number of
pairs P; see ``objectives``) are known before any backward: the objective's local statistics and
the loop's counters are all-reduced in one call. Each micro-batch's loss (already divided by those
global denominators) is scaled by the world size because FSDP averages gradients over ranks: the
update equals that of one process seeing the whole global batch. After the backward passes the
objective's metric sums are all-reduced in one call, and the objective updates its state (MPO's
reward shift) once; that state is part of the checkpoint.

A step whose loss or gradient norm is not finite (NaN / inf) applies no update. By default the run
stops there with :class:`NonFiniteStepError` (a UserError: one line, exit 2), nothing saved, so
``checkpoints/latest`` stays the last good checkpoint and ``final/`` is not written;
``train.skip_nonfinite_steps=true`` goes on instead and counts the step (``skipped_steps``). The
decision is reduced over ranks, so every rank takes it.

Live evaluation (``train.eval_every`` or ``train.eval_points`` > 0, and an ``eval_hook``): before
the first step, every :func:`eval_interval` steps and after the last, ``eval_hook(model, step) ->
{name: score}`` runs on every rank with the model in eval mode and no grad; the scores are logged as ``eval/<name>`` with
``samples_seen`` (conversations, captions or pairs so far). The hook gets an unsharded model: an
FSDP-sharded one cannot run a different number of forward passes per rank (the evaluation splits
its items over ranks), nor generation, which calls submodules outside the root's hooks, so the full
weights are gathered into a plain copy on each rank. The random states (python, numpy, torch) are
restored afterwards, so the training run is the same with or without it.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from vlmforge import dist as vdist
from vlmforge.config.train import TrainConfig
from vlmforge.train import checkpoint as ckpt
from vlmforge.train.finite import NonFiniteStepError
from vlmforge.train.metrics import MetricsLogger
from vlmforge.train.mfu import StepFlops
from vlmforge.train.objectives import Objective, build_objective, forward_fn
from vlmforge.train.optim import build_optimizer, build_scheduler, current_lrs
from vlmforge.train.parallel import place_model

# (model, step) -> {name: score}, on every rank (see the module docstring)
EvalHook = Callable[[nn.Module, int], dict[str, float]]

# Testing hook: SIGKILL this process right after the given step (proves kill-and-resume).
KILL_ENV = "VLMFORGE_KILL_AFTER_STEP"


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    final_step: int
    losses: dict[int, float] = field(default_factory=dict)  # steps run by this process


def grad_accum_steps(tcfg: TrainConfig, world_size: int) -> int:
    per_step = int(tcfg.micro_batch_size) * world_size
    if tcfg.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={tcfg.global_batch_size} is not a multiple of "
            f"micro_batch_size x processes = {tcfg.micro_batch_size} x {world_size}"
        )
    return tcfg.global_batch_size // per_step


def eval_interval(tcfg: TrainConfig, total_steps: int) -> int:
    """Steps between live evaluations: train.eval_points > 0 spreads that many over the run
    (ceil(total / points)), else train.eval_every; 0 = off."""
    if tcfg.eval_points > 0:
        return max(1, -(-int(total_steps) // int(tcfg.eval_points)))
    return int(tcfg.eval_every)


def samples_in(batch: dict[str, torch.Tensor]) -> int:
    """Training samples in a micro-batch: preference pairs, else the samples packed in each row
    (``seq_ids`` numbers them from 0, -1 on padding), else one per row."""
    if batch.get("pair_ids") is not None:
        return int(batch["pair_ids"].numel())
    seq = batch.get("seq_ids")
    if seq is not None:
        return int((seq.max(dim=1).values + 1).clamp(min=0).sum())
    return int(batch["input_ids"].shape[0])


def random_states() -> dict[str, Any]:
    """Every random state the training loop may draw from (python, numpy, torch CPU and CUDA)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


class Trainer:
    """Runs optimizer steps ``start .. total_steps`` over ``loader`` (an iterable of micro-batch
    dicts with ``state_dict()/load_state_dict()`` for exact resume; ``set_epoch(e)`` if it has one).
    ``objective``: what the micro-batches are trained for (default: next-token prediction with
    ``train.loss_reduction``; the mpo stage hands in an :class:`~vlmforge.train.objectives.MPOObjective`)."""

    def __init__(
        self,
        tcfg: TrainConfig,
        model: nn.Module,
        loader: Iterable[dict[str, torch.Tensor]],
        total_steps: int,
        run_dir: str | os.PathLike,
        device: torch.device,
        export_fn: Callable[[nn.Module, Path], None] | None = None,
        on_end: Callable[[Path], None] | None = None,
        objective: Objective | None = None,
        eval_hook: EvalHook | None = None,
    ) -> None:
        self.tcfg = tcfg
        self.world = vdist.world_size()
        self.accum = grad_accum_steps(tcfg, self.world)
        self.total_steps = int(total_steps)
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.loader = loader
        self.export_fn = export_fn
        self.on_end = on_end
        self.objective = objective if objective is not None else build_objective(tcfg)
        self.objective.setup(model, tcfg, device, self.world)  # before placing: a live reference copies the model
        self.eval_every = eval_interval(tcfg, total_steps)
        self.eval_hook = eval_hook if self.eval_every > 0 else None
        # the unsharded model the hook runs on under FSDP: its structure only (meta tensors) between
        # evaluations, so no rank holds a second full model while it trains
        self._eval_copy = (copy.deepcopy(model).to("meta") if self.eval_hook is not None and self.world > 1
                           and tcfg.fsdp else None)
        self.model, self.place = place_model(model, tcfg, device, self.world)
        self.step_flops = StepFlops(self.model, tcfg, self.place.device)
        if vdist.is_main() and tcfg.progress_bar:
            print(self.step_flops.describe(), flush=True)
        self.model.train()
        self._run = forward_fn(self.model, self.place)
        self.optimizer = build_optimizer(self.model, tcfg)
        self.scheduler = build_scheduler(self.optimizer, tcfg, self.total_steps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.step = 0
        self.epoch = 0
        # samples: conversations (SFT), captions (pretraining) or pairs (MPO), the x of the eval curves
        self.counters = {"tokens": 0, "real_tokens": 0, "supervised_tokens": 0, "rows": 0, "samples": 0}
        self.counters.update({k: 0 for k in self.objective.counters})
        if tcfg.skip_nonfinite_steps:
            self.counters["skipped_steps"] = 0  # steps whose update was skipped (non-finite loss / grad norm)
        self._it = None
        self._saved_step = -1

    # ------------------------------------------------------------ data

    def _start_epoch(self) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._it = iter(self.loader)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._start_epoch()
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            try:
                return next(self._it)
            except StopIteration:
                skipped = getattr(self.loader, "skipped", None)
                why = f" (samples skipped, by reason: {skipped})" if skipped else ""
                raise RuntimeError(f"the training data yielded no batch in a whole epoch{why}") from None

    def _rank_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "data": self.loader.state_dict()}

    # ------------------------------------------------------------ resume / save

    def maybe_resume(self) -> int:
        latest = ckpt.latest_checkpoint(self.ckpt_root) if self.tcfg.resume else None
        if latest is None:
            return 0
        trainer_state, rank_state = ckpt.load_checkpoint(latest, self.model, self.optimizer, self.scheduler)
        self.step = int(trainer_state["step"])
        self.counters.update(trainer_state.get("counters", {}))
        self.objective.load_state_dict(trainer_state.get("objective", {}))
        self.epoch = int(rank_state["epoch"])
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self.loader.load_state_dict(rank_state["data"])
        self._it = iter(self.loader)
        self._saved_step = self.step
        if vdist.is_main():
            print(f"resumed from {latest} at step {self.step}", flush=True)
        return self.step

    def _weights_finite(self) -> bool:
        """Every trainable weight finite on every rank (collective)."""
        bad = torch.zeros((), dtype=torch.float64, device=self.place.device)
        for p in self.params:
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local.detach())).any().double()
        vdist.all_reduce_sum(bad)
        return float(bad) == 0

    def _last_good(self) -> str:
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if latest is None:
            return "no checkpoint was written before it (train.checkpoint_every)"
        return f"{self.ckpt_root / ckpt.LATEST} still names {latest.name}, the last good checkpoint"

    def save(self) -> Path:
        if not self._weights_finite():
            raise NonFiniteStepError(
                f"after step {self.step} some weights are NaN or infinite; not saving them "
                f"({self._last_good()}); lower train.lr or check the data"
            )
        self._saved_step = self.step
        return ckpt.save_checkpoint(
            self.ckpt_root,
            self.step,
            self.model,
            self.optimizer,
            self.scheduler,
            rank_state=self._rank_state(),
            trainer_state={"counters": self.counters, "total_steps": self.total_steps,
                           "objective": self.objective.state_dict()},
            keep_last=int(self.tcfg.keep_last),
        )

    # ------------------------------------------------------------ one step

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.place.device
        return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        wait = 0.0
        micro = []
        for _ in range(self.accum):
            tw = time.perf_counter()
            batch = self._next_batch()
            wait += time.perf_counter() - tw
            micro.append(self._to_device(batch))
        dev = self.place.device
        # the objective's local statistics and the loop's counters, summed over ranks in one call
        local = dict(self.objective.step_stats(micro))
        local["tokens"] = sum(b["input_ids"].numel() for b in micro)
        local["real_tokens"] = sum(int((b["seq_ids"] >= 0).sum()) if b.get("seq_ids") is not None
                                   else b["input_ids"].numel() for b in micro)
        local["rows"] = sum(b["input_ids"].shape[0] for b in micro)
        local["samples"] = sum(samples_in(b) for b in micro)
        local["model_flops"] = float(self.step_flops.flops(micro)["total"])
        names = list(local)
        packed = torch.stack([torch.as_tensor(local[k], dtype=torch.float64, device=dev) for k in names])
        vdist.all_reduce_sum(packed)
        stats = dict(zip(names, packed.tolist()))
        self.objective.begin_step(stats)
        sums: dict[str, torch.Tensor] = {}
        for i, b in enumerate(micro):
            loss, parts = self.objective.micro_loss(self._run, b, i)
            (loss * self.world).backward()
            for k, v in parts.items():
                sums[k] = sums[k] + v.double() if k in sums else v.double()
        keys = list(sums)
        loss_sums = torch.stack([sums[k].to(dev) for k in keys]) if keys else torch.zeros(0, dtype=torch.float64, device=dev)
        vdist.all_reduce_sum(loss_sums)  # the step's metric sums over ranks, one call
        max_norm = float(self.tcfg.grad_clip) if self.tcfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # [loss non-finite, grad norm non-finite] on any rank: every rank takes the same decision
        flags = torch.stack([~torch.isfinite(loss_sums).all(), ~torch.isfinite(grad_norm.to(dev))]).double()
        vdist.all_reduce_sum(flags)
        bad_loss, bad_grad = (f > 0 for f in flags.tolist())
        lrs = current_lrs(self.optimizer)  # the lr this step used
        if not (bad_loss or bad_grad):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        step_time = time.perf_counter() - t0
        # data wait: the slowest rank's wait bounds the step; report rank-0's (a cheap, honest proxy)
        self.step += 1
        tokens, real, sup, rows = (stats[k] for k in ("tokens", "real_tokens", "supervised_tokens", "rows"))
        for k in ("tokens", "real_tokens", "supervised_tokens", "rows", "samples", *self.objective.counters):
            self.counters[k] += int(stats[k])
        metrics = self.objective.end_step(dict(zip(keys, loss_sums.tolist())), stats, applied=not (bad_loss or bad_grad))
        row = {
            "step": self.step,
            "epoch": int(getattr(self.loader, "epoch", self.epoch)),
            "loss": metrics.pop("loss"),
            **lrs,
            "grad_norm": float(grad_norm),
            "tokens_per_s": real / step_time,
            "real_token_fraction": real / tokens if tokens else 0.0,
            "supervised_tokens": int(sup),
            "rows": int(rows),
            "step_time": step_time,
            "data_wait": wait,
            "data_wait_fraction": wait / step_time if step_time > 0 else 0.0,
            **self.step_flops.metrics(stats["model_flops"], step_time, self.world),
            **metrics,
        }
        if bad_loss or bad_grad:
            row["nonfinite"] = "loss" if bad_loss else "grad_norm"
        return row

    def _on_nonfinite(self, row: dict[str, Any]) -> None:
        """A step without an update (already counted when skipped): say so, or stop the run."""
        what = f"the loss is {row['loss']}" if row["nonfinite"] == "loss" else (
            f"the gradient norm is {row['grad_norm']} (loss {row['loss']:.4f})")
        if not self.tcfg.skip_nonfinite_steps:
            raise NonFiniteStepError(
                f"step {self.step}: {what}; stopped without updating or saving the weights "
                f"({self._last_good()}); lower train.lr or check the data, or set "
                "train.skip_nonfinite_steps=true to skip such steps"
            )
        if vdist.is_main():
            print(f"step {self.step}: {what}; update skipped (train.skip_nonfinite_steps), "
                  f"{self.counters['skipped_steps']} skipped so far", flush=True)

    # ------------------------------------------------------------ live evaluation

    def _unsharded_model(self) -> nn.Module:
        """The model the eval hook runs on: the live one, or under FSDP the plain copy loaded with
        the full weights (collective: one all-gather per parameter, in the same order on every rank)."""
        if self._eval_copy is None:
            return self.model
        self._eval_copy.to_empty(device=self.place.device)
        self._eval_copy.llm.tie_weights()  # moving to meta unties shared weights (tied embeddings)
        mine = dict(self._eval_copy.named_parameters())
        live = dict(self.model.named_parameters())
        if mine.keys() != live.keys():
            raise RuntimeError("the evaluation copy's parameters differ from the sharded model's")
        with torch.no_grad():
            for name, p in live.items():
                mine[name].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)
            copies = dict(self._eval_copy.named_buffers())
            live_buffers = dict(self.model.named_buffers())
            if copies.keys() - live_buffers.keys():  # to_empty left them uninitialised
                raise RuntimeError(f"the evaluation copy has buffers the sharded model lacks: "
                                   f"{sorted(copies.keys() - live_buffers.keys())}")
            for name, b in copies.items():
                b.copy_(live_buffers[name])
        return self._eval_copy

    def evaluate(self, log: MetricsLogger) -> dict[str, Any]:
        """Run the eval hook at the current step (every rank) and log its scores; returns the row."""
        states = random_states()
        t0 = time.perf_counter()
        model = self._unsharded_model()
        model.eval()
        try:
            with torch.no_grad():
                scores = self.eval_hook(model, self.step)
        finally:
            restore_random_states(states)
            if self._eval_copy is not None:
                self._eval_copy.to("meta")  # frees the gathered weights
            self.model.train()
        row = {"step": self.step, "samples_seen": int(self.counters["samples"]),
               **{f"eval/{k}": float(v) for k, v in scores.items()},
               "eval_seconds": time.perf_counter() - t0}
        log.log_eval(row)
        return row

    # ------------------------------------------------------------ the run

    def fit(self) -> TrainResult:
        # before a resume loads a checkpoint: the model still holds its initial weights
        self.objective.before_training(self._run, self.model, self.run_dir, self.tcfg, self.place.device)
        start = self.maybe_resume()
        result = TrainResult(run_dir=self.run_dir, start_step=start, final_step=start)
        log = MetricsLogger(
            self.run_dir,
            total_steps=self.total_steps,
            start_step=start,
            enabled=vdist.is_main(),
            tensorboard=bool(self.tcfg.tensorboard),
            progress_bar=bool(self.tcfg.progress_bar),
        )
        kill_after = int(os.environ.get(KILL_ENV, "-1"))
        every = int(self.tcfg.checkpoint_every)
        eval_every = self.eval_every
        try:
            if self.eval_hook is not None and start == 0:
                self.evaluate(log)  # the curves' first point: the model training starts from
            while self.step < self.total_steps:
                row = self.train_step()
                result.losses[self.step] = row["loss"]
                if "nonfinite" in row and self.tcfg.skip_nonfinite_steps:
                    self.counters["skipped_steps"] += 1
                if "skipped_steps" in self.counters:
                    row["skipped_steps"] = self.counters["skipped_steps"]
                if ("nonfinite" in row or self.step % max(1, int(self.tcfg.log_every)) == 0
                        or self.step == self.total_steps):
                    log.log(row)
                if "nonfinite" in row:
                    self._on_nonfinite(row)
                # before the checkpoint: a run killed in between redoes this step's evaluation
                if self.eval_hook is not None and (self.step % eval_every == 0 or self.step == self.total_steps):
                    self.evaluate(log)
                if every > 0 and self.step % every == 0 and self.step < self.total_steps:
                    self.save()
                if self.step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            log.close()
        result.final_step = self.step
        if self._saved_step != self.step:
            self.save()
        if self.export_fn is not None:
            self.export_fn(self.model, self.run_dir / "final")
        vdist.barrier()
        if vdist.is_main() and self.on_end is not None:
            self.on_end(self.run_dir)
        return result
