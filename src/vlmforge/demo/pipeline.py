"""The demo pipeline: every stage is run through its own CLI command, in-process, so the demo
is exactly the sequence of commands a user would type (they are listed in the report).
Its settings are recipes: recipes/demo/, one folder per size (see ``vlmforge.demo.presets``)."""

from __future__ import annotations

import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.demo.presets import DemoPreset, load_preset
from vlmforge.demo.report import write_demo_report
from vlmforge.errors import UserError
from vlmforge.files import prepare_out_dir
from vlmforge.model.build import build_vlm
from vlmforge.model.saving import save_vlm
from vlmforge.text.tokenization import load_tokenizer

PRETRAIN_RECIPE = "demo/pretrain"
# Best-of-N on the reasoning problems: VisualPRM's N = 8; prm-data's solutions per problem (its
# default) and Monte Carlo continuations per step (half its default 8: the stage's cost is mostly
# rollouts); generation length of a solution.
BEST_OF_N = 8
PRM_SOLUTIONS = 4
PRM_ROLLOUTS = 4
MATH_TOKENS = 64
SFT_RECIPE = "demo/sft"
# Generation (eval, preference replies, rollouts, Best-of-N) runs one token at a time through a
# 128-wide LM: its ops are too small to split over threads, and a second thread only waits for
# the first (far worse when anything else uses a core), so those stages run on one thread.
GENERATION_THREADS = 1
EVAL_TASKS = "synth"


@dataclass
class StageLog:
    """What ran, how long it took, and the equivalent shell command."""

    rows: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def run(self, title: str, argv: list[str], threads: int | None = None) -> None:
        """Run one stage; ``threads``: torch's CPU threads for it (None: as set for the demo)."""
        n = len(self.rows) + 1
        print(f"\n=== [{n}] {title}: vlmforge {shlex.join(argv)}", flush=True)
        t0 = time.perf_counter()
        before = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            code = main(argv)
        finally:
            torch.set_num_threads(before)
        seconds = time.perf_counter() - t0
        self.rows.append({"stage": title, "seconds": round(seconds, 1), "command": "vlmforge " + shlex.join(argv)})
        if code != 0:
            raise UserError(f"demo stage '{title}' failed (exit code {code}); see the messages above")
        print(f"=== [{n}] {title} done in {seconds:.1f}s (total {time.perf_counter() - self.started:.0f}s)", flush=True)


def _synth_overrides(preset: DemoPreset) -> list[str]:
    return [a for k, v in preset.synth for a in ("--set", f"{k}={v}")]


def _sets(**kv) -> list[str]:
    return [a for k, v in kv.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]


def _save_initial_checkpoint(tok_dir: Path, vision_dir: Path, out: Path, seed: int, overrides: list[str]) -> None:
    """The randomly initialised model that pretraining starts from, saved so it can be evaluated."""
    cfg = load_recipe(PRETRAIN_RECIPE, [f"tokenizer.path={tok_dir}", f"seed={seed}", f"model.vision.pretrained={vision_dir}", *overrides])
    tok = load_tokenizer(str(tok_dir))
    model = build_vlm(cfg.model, tok, seed=seed)
    save_vlm(model, tok, cfg, out)


def run_demo(out: str, size: str = "default", seed: int = 0, curate: bool = True,
             overwrite: bool = False, threads: int = 0, overrides: list[str] | None = None,
             pretrain_overrides: list[str] | None = None, sft_overrides: list[str] | None = None,
             mpo_overrides: list[str] | None = None, prm_overrides: list[str] | None = None) -> Path:
    """``overrides`` (KEY=VALUE) go to every stage after the demo's own settings, so e.g.
    ``synth.image_size=72`` or ``model.projector.kind=pixel_shuffle_mlp`` change the whole run;
    ``pretrain_overrides`` / ``sft_overrides`` / ``mpo_overrides`` / ``prm_overrides`` only reach that
    training stage (pretraining's also reach the packer and the initial model, MPO's the preference
    index, PRM's the critic's SFT index).
    ``size`` names a folder of recipes/demo/."""
    s = load_preset(size)  # every recipe of the size is validated here, before any work
    pretrain_kv = [*(overrides or []), *(pretrain_overrides or [])]
    every_sets = [a for kv in overrides or [] for a in ("--set", kv)]
    pretrain_sets = [a for kv in pretrain_kv for a in ("--set", kv)]
    sft_sets = every_sets + [a for kv in sft_overrides or [] for a in ("--set", kv)]
    mpo_sets = every_sets + [a for kv in mpo_overrides or [] for a in ("--set", kv)]
    prm_sets = every_sets + [a for kv in prm_overrides or [] for a in ("--set", kv)]
    # the overrides meet the schema here too (a wrong key or choice fails before any stage runs)
    load_recipe(PRETRAIN_RECIPE, pretrain_kv)
    load_recipe(SFT_RECIPE, [*(overrides or []), *(sft_overrides or [])])
    load_recipe(s.mpo_recipe, [*(overrides or []), *(mpo_overrides or [])])
    load_recipe(s.prm_recipe, [*(overrides or []), *(prm_overrides or [])])
    out_dir = Path(out)
    if prepare_out_dir(out_dir, overwrite=overwrite):  # not empty, and --overwrite: start from an empty folder
        shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if not threads and torch.get_num_threads() > 1 and busy >= 1.0:
        # torch's threads wait for each other at every op: with a core taken by another job, small
        # ops get many times slower, not just half as fast
        print(f"note: the load average is {busy:.1f} on {os.cpu_count()} cores; other jobs are using the CPU, "
              f"so with {torch.get_num_threads()} threads per op this run may be several times slower "
              f"(--threads N sets fewer)", flush=True)
    gen_threads = min(GENERATION_THREADS, torch.get_num_threads())
    world, tok = out_dir / "world", out_dir / "tokenizer"
    runs, evals = out_dir / "runs", out_dir / "eval"
    log = StageLog()

    log.run("synth", ["synth", "--out", str(world), "--seed", str(seed), "--quiet", *_synth_overrides(s), *every_sets])
    log.run("tokenizer", ["tokenizer", "train", "--corpus", str(world), "--out", str(tok), *every_sets])

    # The VLM's vision tower: trained on the world's labelled objects, then frozen (the demo's
    # stand-in for a pretrained SigLIP; the report says so).
    vision = out_dir / "vision"
    log.run("vision-pretrain", ["vision-pretrain", "--data", str(world / "vision"), "--out", str(vision),
                                "--epochs", str(s.vision_epochs), "--no-progress", "--set", f"seed={seed}",
                                "--set", f"vision_pretrain.seed={seed}", *every_sets])

    shards = str(world / "captions")
    faults = str(world / "captions" / "faults.jsonl")
    cur = out_dir / "curate"
    # The filter network learns image-text matching contrastively on the trusted set (the crawl
    # minus its known-bad pairs) and scores the crawl.
    log.run("curate: train filter network", [
        "curate", "train-filter", "--in", shards, "--exclude-faults", faults,
        "--out", str(cur / "filter"), "--epochs", str(s.filter_epochs), "--set", f"seed={seed}", *every_sets])
    if curate:
        log.run("curate: score", ["curate", "score", "--scorer", "dfn", "--model", str(cur / "filter"),
                                  "--in", shards, "--out", str(cur / "scores"), *every_sets])
        log.run("curate: filter", ["curate", "filter", "--in", shards, "--scores", f"dfn={cur / 'scores'}",
                                   "--keep", "dfn>=calibrated", "--ground-truth", faults, "--out", str(cur / "filtered"), *every_sets])
        # exact duplicates only: the world repeats scenes on purpose, so perceptual near-dup removal
        # would also drop legitimate pairs
        log.run("curate: dedup", ["curate", "dedup", "--in", str(cur / "filtered"), "--near", "none",
                                  "--ground-truth", faults, "--out", str(cur / "curated"), *every_sets])
        shards = str(cur / "curated")

    common = _sets(seed=seed, tokenizer__path=tok, model__vision__pretrained=vision)
    log.run("pack", ["pack", "--recipe", PRETRAIN_RECIPE, "--in", shards, "--out", str(out_dir / "packed"),
                     "--tokenizer", str(tok), "--no-progress", *common, *pretrain_sets])

    _save_initial_checkpoint(tok, vision, runs / "init", seed, pretrain_kv)
    limit = [] if s.eval_limit is None else ["--limit", str(s.eval_limit)]
    shared = ["--synth-dir", str(world), "--batch-size", "32", "--mc-protocol", "generate,likelihood", *limit, *every_sets]
    eval_args = ["--tasks", EVAL_TASKS, "--max-new-tokens", "12", *shared]
    # after SFT the model can reason in steps: the phases from then on also ask synth-math, whose
    # worked solutions need more new tokens (short answers stop at <|im_end|> long before)
    late_eval_args = ["--tasks", f"{EVAL_TASKS},synth-math", "--max-new-tokens", str(MATH_TOKENS), *shared]
    log.run("eval before training", ["eval", "--ckpt", str(runs / "init"), *eval_args, "--out", str(evals / "init")], threads=gen_threads)

    log.run("pretrain", ["train", "--recipe", PRETRAIN_RECIPE, *common, *_sets(
        train__data_path=out_dir / "packed", train__init_from=runs / "init",
        train__run_dir=runs / "pretrain", train__epochs=s.pretrain_epochs), *pretrain_sets])
    log.run("eval after pretraining", ["eval", "--ckpt", str(runs / "pretrain" / "final"), *eval_args,
                                       "--out", str(evals / "pretrain")], threads=gen_threads)

    log.run("sft index", ["sft-index", "--recipe", SFT_RECIPE, "--input", str(world / "sft" / "llava.json"),
                          "--image-root", str(world / "sft"), "--tokenizer", str(tok),
                          "--out", str(out_dir / "sft_index"), *common, *sft_sets])
    log.run("sft", ["train", "--recipe", SFT_RECIPE, *common, *_sets(
        sft__index=out_dir / "sft_index", sft__image_root=world / "sft", train__init_from=runs / "pretrain",
        train__run_dir=runs / "sft", train__epochs=s.sft_epochs, eval__synth_dir=world), *sft_sets])
    log.run("eval after SFT", ["eval", "--ckpt", str(runs / "sft" / "final"), *late_eval_args, "--out", str(evals / "sft")], threads=gen_threads)

    # MPO on pairs the SFT model makes itself: its sampled replies to training-split questions
    # (never the benchmarks) judged right or wrong by the eval scorers, plus dropout next-token
    # prediction on long answers.
    questions, prefs = world / "questions", out_dir / "preference"
    log.run("preference build", [
        "preference", "build", "--ckpt", str(runs / "sft" / "final"), "--out", str(prefs / "pairs"),
        "--questions", *(f"{kind}:{questions / (kind + '.jsonl')}" for kind in ("mcq", "vqa", "pope")),
        "--long-answers", str(questions / "long_answers.jsonl"), "--seed", str(seed), "--quiet"], threads=gen_threads)
    log.run("preference index", ["preference", "index", "--recipe", s.mpo_recipe, "--input", str(prefs / "pairs" / "meta.json"),
                                 "--tokenizer", str(tok), "--out", str(prefs / "index"), *common, *mpo_sets])
    log.run("mpo", ["train", "--recipe", s.mpo_recipe, *common, *_sets(
        preference__index=prefs / "index", train__init_from=runs / "sft", train__run_dir=runs / "mpo"), *mpo_sets])
    log.run("eval after MPO", ["eval", "--ckpt", str(runs / "mpo" / "final"), *late_eval_args, "--out", str(evals / "mpo")], threads=gen_threads)

    # Test-time scaling (VisualPRM): the final policy solves training-split reasoning problems,
    # Monte Carlo continuations from every step label it '+' or '-', a process reward model learns
    # the labels, and the held-out problems are answered Best-of-N, the critic picking the answer.
    prm = out_dir / "prm"
    log.run("prm data", ["prm-data", "--policy", str(runs / "mpo" / "final"),
                         "--questions", f"math:{questions / 'math.jsonl'}", "--image-root", str(questions),
                         "--out", str(prm / "data"), "--solutions", str(PRM_SOLUTIONS), "--rollouts", str(PRM_ROLLOUTS),
                         "--max-new-tokens", str(MATH_TOKENS), "--seed", str(seed), "--quiet"], threads=gen_threads)
    log.run("prm index", ["sft-index", "--recipe", s.prm_recipe, "--input", str(prm / "data" / "prm.json"),
                          "--image-root", str(questions), "--tokenizer", str(tok), "--out", str(prm / "index"),
                          *common, *prm_sets])
    log.run("prm", ["train", "--recipe", s.prm_recipe, *common, *_sets(
        sft__index=prm / "index", sft__image_root=questions, train__init_from=runs / "mpo",
        train__run_dir=runs / "prm"), *prm_sets])
    bon = ["--tasks", "synth-math", "--synth-dir", str(world), "--batch-size", "32", "--max-new-tokens", str(MATH_TOKENS),
           *every_sets]
    if s.eval_limit is not None:
        bon += ["--limit", str(s.eval_limit)]
    log.run(f"eval best-of-{BEST_OF_N}", ["eval", "--ckpt", str(runs / "mpo" / "final"), *bon, "--best-of-n", str(BEST_OF_N),
                                         "--critic", str(runs / "prm" / "final"), "--select", "prm",
                                         "--out", str(evals / "best_of_n")], threads=gen_threads)
    # where the critic fails: its verdicts on held-out solutions whose first wrong step is known
    log.run("prm score: known wrong steps", ["prm-score", "--critic", str(runs / "prm" / "final"),
                                             "--input", str(world / "eval" / "math_steps.jsonl"),
                                             "--out", str(evals / "prm_steps" / "scores.jsonl"), *every_sets], threads=gen_threads)

    report = write_demo_report(out_dir, log.rows, size=size, curated=curate)
    total = time.perf_counter() - log.started
    print(f"\ndemo finished in {total:.0f}s: {report}", flush=True)
    print((out_dir / "scores.txt").read_text(), flush=True)
    return report
