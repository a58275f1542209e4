"""Evaluate a checkpoint on benchmark files, offline, with rule-based scorers.

A task is a data file on local disk (jsonl, parquet, or VLMEvalKit TSV with base64 images) plus
a scorer kind:

  mcq      multiple choice (SEEDBench, MMStar, AI2D, MMMU style): option letter extraction
  mmbench  multiple choice with CircularEval (right only if every option rotation is right)
  vqa      open VQA, official VQA accuracy (TextVQA, VQAv2, GQA, VizWiz, OK-VQA style)
  pope     yes/no hallucination probe: accuracy, precision, recall, F1, yes-ratio
  math     MathVista style: choice or number, compared at the task's precision

--tasks takes a comma-separated list of KIND:PATH, NAME=KIND:PATH, a YAML task file, or the
synthetic world's built-in benchmarks (synth-mcq, synth-vqa, synth-pope, synth-math, synth-multi; synth = the first three;
needs --synth-dir). Writes OUT/results.json (metrics, chance levels, counts) and
OUT/predictions.jsonl (per sample: prompt, prediction, extracted answer, score).

Examples:
  vlmforge eval --ckpt runs/sft/final --tasks synth --synth-dir runs/world
  vlmforge eval --ckpt C --tasks mmb=mmbench:MMBench_DEV_EN.tsv,vqa:textvqa_val.jsonl --limit 200
  vlmforge eval --ckpt C --tasks synth-vqa --synth-dir W --shots 0,8 --seeds 0,1,2
  vlmforge eval --ckpt C --tasks synth-mcq --synth-dir W --mc-protocol generate,likelihood
  torchrun --nproc-per-node 8 -m vlmforge eval --ckpt C --tasks mmb=mmbench:MMBench_DEV_EN.tsv
  vlmforge eval --ckpt C --tasks synth-math --synth-dir W --max-new-tokens 128 --best-of-n 8 --critic PRM_CKPT

Best-of-N (--best-of-n N > 1, generate protocol): candidate 0 is the greedy reply, candidates 1..N-1
are sampled (--temperature 0.7, --top-p 0.95, seeded per item and candidate); a process reward
model (--critic, a vlmforge checkpoint trained with train.stage=prm) scores every step of every
candidate. --select picks one per question: prm (best --aggregate of the step scores: mean, min,
last, product), orm (best last-step score), majority (most frequent answer) or first (greedy);
default prm with a critic, else majority. The task's metrics are the selected candidates';
results.json adds the BoN-k curves (every rule and the oracle pass@k at k = 1, 2, 4, ..., N) and
predictions.jsonl each row's candidates.

Under torchrun each rank loads the model on its own device and runs every world_size-th batch
(batches sorted by prompt length); rank 0 merges the predictions in input order and writes the
outputs, which equal a one-process run's.
"""

from __future__ import annotations

import argparse

HELP = "evaluate a checkpoint on MCQ / VQA / POPE / math tasks (results.json + predictions.jsonl)"
# eval section key -> the flag that sets it
FLAGS = {"tasks": "--tasks", "synth_dir": "--synth-dir", "limit": "--limit", "batch_size": "--batch-size",
         "max_new_tokens": "--max-new-tokens", "shots": "--shots", "seeds": "--seeds", "strict": "--no-strict",
         "mc_protocols": "--mc-protocol", "allow_absolute_paths": "--allow-absolute-paths",
         "best_of_n": "--best-of-n", "critic": "--critic", "select": "--select", "aggregate": "--aggregate",
         "temperature": "--temperature", "top_p": "--top-p", "sample_seed": "--sample-seed"}


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vlmforge.clitools import add_recipe_args

    parser.add_argument("--ckpt", required=True, help="vlmforge checkpoint folder (model.safetensors, config.yaml, tokenizer/)")
    parser.add_argument("--tasks", help="comma-separated task specs (see above); default: eval.tasks of the recipe")
    parser.add_argument("--synth-dir", help="`vlmforge synth` output folder, for the built-in synth-* tasks")
    parser.add_argument("--limit", type=int, help="first N questions of each task")
    parser.add_argument("--out", help="output folder (default: CKPT/eval; refused if not empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write over the results already in the output folder")
    parser.add_argument("--batch-size", type=int, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--shots", type=_int_list, help="shot counts, e.g. 0,8 (k-shot: interleaved demonstrations)")
    parser.add_argument("--seeds", type=_int_list, help="demonstration draws for k > 0, e.g. 0,1,2 (mean and std)")
    parser.add_argument("--mc-protocol", dest="mc_protocols", type=lambda t: [x for x in t.split(",") if x.strip()],
                        help="multiple choice: generate (parse the letter, default), likelihood (rank option texts "
                             "by likelihood, SEED-Bench style; reported as NAME@likelihood), or generate,likelihood")
    parser.add_argument("--no-strict", dest="strict", action="store_const", const=False,
                        help="skip and count bad rows / undecodable images instead of stopping")
    parser.add_argument("--allow-absolute-paths", dest="allow_absolute_paths", action="store_const", const=True,
                        help="accept absolute image paths in task rows (default: refused as path_outside_root)")
    parser.add_argument("--best-of-n", dest="best_of_n", type=int,
                        help="Best-of-N: N candidate replies per question (greedy + N-1 sampled); 1 = off (default)")
    parser.add_argument("--critic", help="process reward model checkpoint (train.stage=prm) scoring each step")
    parser.add_argument("--select", help="Best-of-N selection: prm | orm | majority | first "
                                         "(default: prm with --critic, else majority)")
    parser.add_argument("--aggregate", help="a candidate's PRM score from its step scores: mean (default) | min | "
                                            "last | product")
    parser.add_argument("--temperature", type=float, help="sampling temperature of candidates 1..N-1 (default 0.7)")
    parser.add_argument("--top-p", dest="top_p", type=float, help="nucleus sampling of candidates 1..N-1 (default 0.95)")
    parser.add_argument("--sample-seed", dest="sample_seed", type=int, help="seed of the sampled candidates (default 0)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu); under torchrun: cpu or cuda "
                             "(each rank takes cuda:LOCAL_RANK)")
    add_recipe_args(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omegaconf.errors import ValidationError

    from vlmforge.config import load_recipe
    from vlmforge.errors import UserError

    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint folder {ckpt} not found")
    # Settings: recipe (given, else the checkpoint's own) <- --set <- flags.
    recipe = args.recipe or (str(ckpt / "config.yaml") if (ckpt / "config.yaml").is_file() else None)
    cfg = load_recipe(recipe, args.overrides)
    ev = cfg.eval
    for key, option in FLAGS.items():
        value = getattr(args, key)
        if value is not None:
            try:  # the eval section is typed: a value outside a field's choices is refused here
                ev[key] = [t for t in value.split(",") if t.strip()] if key == "tasks" else value
            except ValidationError as e:
                raise UserError(f"{option}: {str(e).splitlines()[0]}") from None
    if not ev.tasks:
        raise UserError("no tasks: give --tasks (or eval.tasks in the recipe)")
    if ev.limit is not None and ev.limit <= 0:
        raise UserError("--limit must be positive")
    if ev.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    from vlmforge.eval.bestofn import BestOfN, check_settings, critic_scorer

    bon = BestOfN(n=ev.best_of_n, select=ev.select, aggregate=ev.aggregate, temperature=ev.temperature,
                  top_p=ev.top_p, seed=ev.sample_seed)
    try:
        check_settings(bon, bool(ev.critic))
    except ValueError as e:
        raise UserError(str(e)) from None
    critic = Path(ev.critic) if ev.critic and bon.on else None  # best_of_n 1: no candidates to score
    if critic is not None and (critic / "final" / "model.safetensors").is_file():
        critic = critic / "final"  # a run folder, as train.init_from and prm-score accept
    if critic is not None and not critic.is_dir():
        raise UserError(f"--critic: checkpoint folder {critic} not found")
    from vlmforge.eval.items import TaskError
    from vlmforge.eval.runner import MC_PROTOCOLS, evaluate, summary_table

    if not ev.mc_protocols:
        raise UserError(f"--mc-protocol takes a comma list of {', '.join(MC_PROTOCOLS)}; got none")
    from vlmforge.eval.specs import parse_task_specs
    from vlmforge.eval.tasks import load_task

    try:  # load (and validate) every task before the model, so data errors show up at once
        tasks = [load_task(s, limit=ev.limit, strict=ev.strict, allow_absolute_paths=ev.allow_absolute_paths)
                 for s in parse_task_specs(list(ev.tasks), ev.synth_dir)]
    except TaskError as e:
        raise UserError(str(e)) from None

    from vlmforge import dist
    from vlmforge.files import prepare_out_dir
    from vlmforge.model.saving import load_vlm

    out = Path(args.out) if args.out else ckpt / "eval"
    # Every rank checks the folder before any collective, so none can see rank 0's outputs in it.
    prepare_out_dir(out, overwrite=args.overwrite, flag="--out" if args.out else "--out (default CKPT/eval)")
    if dist.launched_by_torchrun():
        device = dist.init_distributed(args.device or "auto").device
    else:
        device = dist.resolve_device(args.device)
    is_main = dist.is_main()  # asked now: after cleanup every process reads as rank 0
    try:
        # --set overrides reach the model too (e.g. model.projector.pool_size=null for full resolution).
        model, tokenizer, _ = load_vlm(str(ckpt), overrides=args.overrides, device=str(device))
        info: dict = {"ckpt": str(ckpt)}
        scorer = None
        if critic is not None:  # the critic's own recipe: --set overrides are the policy's
            critic_model, critic_tok, _ = load_vlm(str(critic), device=str(device))
            scorer = critic_scorer(critic_model, critic_tok, batch_size=ev.batch_size)
            info["critic"] = str(critic)
        try:
            results = evaluate(
                model, tokenizer, tasks, limit=ev.limit, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                shots=list(ev.shots), seeds=list(ev.seeds), strict=ev.strict, mc_protocols=list(ev.mc_protocols),
                out_dir=out, config=cfg, info=info, progress=is_main,
                best_of_n=bon if bon.on else None, step_scorer=scorer,
            )
        except TaskError as e:
            raise UserError(str(e)) from None
    finally:
        dist.cleanup()
    if is_main:
        print(summary_table(results))
        print(f"wrote {out / 'results.json'} and {out / 'predictions.jsonl'}")
    return 0
