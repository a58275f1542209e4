"""Train a stage of a recipe: pretraining on packed caption shards, SFT on conversations, MPO
(InternVL's Mixed Preference Optimization) on preference pairs from an SFT checkpoint, or a
process reward model (prm) on critic conversations, the loss on their '+' / '-' verdicts.

  vlmforge train --recipe tiny/pretrain --set train.data_path=out/packed --set tokenizer.path=out/tok
  vlmforge train --recipe tiny/mpo --set preference.index=out/pref-index --set train.init_from=runs/tiny-sft
  vlmforge train --recipe tiny/prm --set sft.index=out/prm-index --set sft.image_root=IMAGES
  torchrun --nproc-per-node 8 [--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT] \\
      -m vlmforge train --recipe open_qwen2vl/sft --set train.init_from=runs/pretrain ...

The same command runs on one process or under torchrun (FSDP2 over all ranks; nccl on GPU,
gloo on CPU). The run folder (train.run_dir) holds config.yaml, metrics.jsonl, tensorboard/,
checkpoints/ (every train.checkpoint_every steps and at the end, the last train.keep_last kept),
final/ (model.safetensors + config.yaml + tokenizer/, read by eval and export), manifest.json and
report.html, and run.json (the settings that define the run, with the fingerprints of its data and
tokenizer); an MPO run also reference/ (the initial model's log-probs of every pair, computed once
before training with mpo.reference=precompute). Running the same command again resumes from
checkpoints/latest and reproduces the per-step losses of an uninterrupted run (bit-identical on
CPU); a rerun with other run settings is refused before anything is written, listing each changed
key (train.resume=false starts over).

train.eval_every=N (or train.eval_points=P: P evaluations spread over the run), with train.eval_tasks
(e.g. [synth-mcq,synth-vqa] and eval.synth_dir), evaluates the live model before the first step,
every N steps and after the last, on every rank's share of
the items: metrics.jsonl gains eval/<task>/<metric> rows with samples_seen, the report a plot of
each benchmark against samples seen.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module stays light for `vlmforge --help`
    from vlmforge.config.recipe import Recipe
    from vlmforge.train.loop import TrainResult

HELP = "train a stage (pretrain | sft | mpo | prm) with FSDP2, resumable checkpoints and a run report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vlmforge.clitools import add_recipe_args

    add_recipe_args(p)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def live_eval_tasks(cfg: Recipe) -> list | None:
    """train.eval_tasks loaded (None when train.eval_every and train.eval_points are 0), before
    anything is written, so a wrong task name or file stops the run at once."""
    t, ev = cfg.train, cfg.eval
    if int(t.eval_every) <= 0 and int(t.eval_points) <= 0:
        return None
    from vlmforge.errors import ConfigError
    from vlmforge.eval.items import TaskError
    from vlmforge.eval.specs import parse_task_specs
    from vlmforge.eval.tasks import load_task

    if not t.eval_tasks:
        key = f"train.eval_points={t.eval_points}" if t.eval_points > 0 else f"train.eval_every={t.eval_every}"
        raise ConfigError(f"{key} needs train.eval_tasks (task names as `vlmforge eval "
                          "--tasks` takes them, e.g. [synth-mcq, synth-vqa] with eval.synth_dir)")
    try:
        return [load_task(s, limit=_eval_limit(cfg), strict=ev.strict, allow_absolute_paths=ev.allow_absolute_paths)
                for s in parse_task_specs(list(t.eval_tasks), ev.synth_dir)]
    except TaskError as e:
        raise ConfigError(f"train.eval_tasks: {e}") from None


def _eval_limit(cfg: Recipe) -> int | None:
    return cfg.train.eval_limit if cfg.train.eval_limit is not None else cfg.eval.limit


def eval_hook(cfg: Recipe, tasks: list, tokenizer):
    """The loop's eval hook: ``tasks`` through the eval runner (greedy, 0-shot, eval.mc_protocols),
    returning ``{"<task>/<metric>": score}`` for every numeric metric of every result."""
    from vlmforge.errors import ConfigError
    from vlmforge.eval.items import TaskError
    from vlmforge.eval.runner import evaluate

    t, ev = cfg.train, cfg.eval
    max_new = t.eval_max_new_tokens if t.eval_max_new_tokens is not None else ev.max_new_tokens

    def hook(model, step: int) -> dict[str, float]:
        try:
            results = evaluate(model, tokenizer, tasks, mc_protocols=list(ev.mc_protocols), limit=_eval_limit(cfg),
                               batch_size=ev.batch_size, max_new_tokens=max_new, strict=ev.strict, progress=False)
        except TaskError as e:
            raise ConfigError(f"train.eval_tasks (at step {step}): {e}") from None
        return {f"{name}/{metric}": float(v) for name, r in results.items() for metric, v in r["metrics"].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    return hook


def train_from_config(cfg: Recipe) -> TrainResult:
    """Run a training stage from a resolved recipe (the command's body)."""
    from pathlib import Path

    from vlmforge import dist as vdist
    from vlmforge.config import save_resolved
    from vlmforge.config.recipe import run_seed
    from vlmforge.files import write_manifest
    from vlmforge.train.loop import Trainer
    from vlmforge.train.runfolder import accept_run, check_run_folder, run_settings
    from vlmforge.train.stages import build_stage, export_final, run_fingerprints, validate

    info = vdist.init_distributed(str(cfg.train.device))
    validate(cfg, info.world_size)
    tasks = live_eval_tasks(cfg)
    run_dir = Path(cfg.train.run_dir)
    # data, checkpoint and tokenizer belong together, and a resume continues the same run: both are
    # checked before anything is written (config.yaml included)
    fingerprints, where = run_fingerprints(cfg)
    settings = run_settings(cfg, info.world_size, fingerprints)
    decision = check_run_folder(run_dir, settings, bool(cfg.train.resume))
    vdist.barrier()  # every rank has read the folder before the main rank changes it
    if info.is_main:
        accept_run(run_dir, settings, decision, where)
        save_resolved(cfg, run_dir)
    vdist.barrier()
    seed = run_seed(cfg)
    pieces = build_stage(cfg, info.rank, info.world_size)
    hook = eval_hook(cfg, tasks, pieces.tokenizer) if tasks is not None else None
    _seed_everything(seed + 1 + info.rank)  # training-time randomness (V2PE deltas) differs per rank

    def on_end(path: Path) -> None:
        write_manifest(
            path,
            "train",
            inputs={"data": pieces.info["data"], "init_from": pieces.info["init_from"]},
            config=cfg,
            counts=dict(trainer.counters, steps=trainer.step),
            dropped=dict(getattr(pieces.loader, "skipped", {}) or {}),
            run=pieces.info,
            final=str(path / "final"),
        )
        if cfg.train.report:
            from vlmforge.report import build_report

            build_report(path)

    trainer = Trainer(
        cfg.train,
        pieces.model,
        pieces.loader,
        total_steps=pieces.total_steps,
        run_dir=run_dir,
        device=info.device,
        export_fn=lambda model, out: export_final(model, pieces.tokenizer, cfg, out),
        on_end=on_end,
        objective=pieces.objective,
        eval_hook=hook,
    )
    result = trainer.fit()
    if info.is_main:
        last = result.losses.get(result.final_step)
        tail = f", last loss {last:.4f}" if last is not None else ""
        if trainer.counters.get("skipped_steps"):
            tail += f", {trainer.counters['skipped_steps']} step(s) skipped (non-finite loss or gradient norm)"
        print(f"trained steps {result.start_step}..{result.final_step}{tail}; weights in {run_dir / 'final'}", flush=True)
    return result


def run(args: argparse.Namespace) -> int:
    from vlmforge import dist as vdist
    from vlmforge.clitools import recipe_from_args

    cfg = recipe_from_args(args)
    try:
        train_from_config(cfg)
    finally:
        vdist.cleanup()
    return 0
