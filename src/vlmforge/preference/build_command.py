"""Make preference pairs from a model's own answers, MMPR's two recipes (InternVL2.5-MPO):

  correctness   questions with known answers (eval task rows: mcq, mmbench, vqa, pope, math; the
                same files, KIND:PATH specs and prompts as `vlmforge eval`): --samples replies per
                question at --temperature, each judged by the kind's rule-based scorer; pairs =
                right x wrong replies (distinct texts, at most --pairs-per-question; a wrong reply
                that states a right reply's answer is not used)
  dropout_ntp   long answers (--long-answers rows {image, question, answer}): chosen = the answer;
                rejected = its first half of words continued by the model WITHOUT the image

Ask training-split questions, never the benchmarks you report (`vlmforge synth` writes
WORLD/questions/ for this). Writes OUT/pairs.jsonl (MMPR rows: image, question, chosen, rejected,
answer_gt, recipe, kind, task, id, source), OUT/meta.json (InternVL meta: the image root) and
OUT/manifest.json (questions, samples, their accuracy, pairs by recipe, questions with no right /
no wrong reply, skipped rows by reason with file:line). Under torchrun the parts are shared over
ranks; a killed run resumes when run again with the same arguments (same pairs as one run).

Examples:
  vlmforge preference build --ckpt runs/sft/final --out runs/pairs \\
      --questions mcq:world/questions/mcq.jsonl vqa:world/questions/vqa.jsonl pope:world/questions/pope.jsonl \\
      --long-answers world/questions/long_answers.jsonl
  torchrun --nproc-per-node 8 -m vlmforge preference build --ckpt C --questions mmb=mmbench:train.tsv --out P
  vlmforge preference index --input runs/pairs/meta.json ...      # then train with train.stage=mpo
"""

from __future__ import annotations

import argparse

HELP = "make preference pairs from a model's samples (right vs wrong replies; dropout next-token prediction)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="the model to sample from (a vlmforge checkpoint folder, e.g. after SFT)")
    parser.add_argument("--questions", nargs="+", default=[], metavar="KIND:FILE",
                        help="question files: KIND:PATH, NAME=KIND:PATH or a .yaml task file (as `vlmforge eval --tasks`)")
    parser.add_argument("--long-answers", metavar="FILE", help="rows {image, question, answer} for dropout next-token prediction")
    parser.add_argument("--out", required=True, help="output folder (a run in it resumes; another run's folder is refused)")
    parser.add_argument("--samples", type=int, default=8, help="replies sampled per question (default 8)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--pairs-per-question", type=int, default=2, help="at most this many pairs per question (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens per reply (default 32); a reply cut there is judged but not paired")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="rows per generate call (default 64): whole questions x --samples, or long answers")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0); each reply draws from its own seed: this one, the task's name, "
                             "the question's id and the reply's number")
    parser.add_argument("--limit", type=int, help="first N questions of each file (and N long answers)")
    parser.add_argument("--image-root", help="folder the rows' image paths are relative to (default: each file's folder)")
    parser.add_argument("--allow-absolute-paths", action="store_true", help="accept absolute image paths in the rows")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row or image (default: skip and count)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import os
    from dataclasses import asdict
    from pathlib import Path

    from vlmforge.errors import UserError
    from vlmforge.eval.items import TaskError
    from vlmforge.eval.specs import BUILTIN_SYNTH, parse_task_specs

    if not args.questions and not args.long_answers:
        raise UserError("nothing to ask: give --questions KIND:FILE ... and/or --long-answers FILE")
    builtin = [q for q in args.questions if q == "synth" or q in BUILTIN_SYNTH]
    if builtin:
        raise UserError(f"--questions {builtin[0]}: the built-in synth-* tasks are the benchmarks; pairs must come from "
                        "training-split questions, e.g. mcq:WORLD/questions/mcq.jsonl")
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        raise UserError(f"--ckpt {ckpt}: checkpoint folder not found")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.long_answers and not Path(args.long_answers).is_file():
        raise UserError(f"--long-answers {args.long_answers}: file not found")
    if args.image_root and not Path(args.image_root).is_dir():
        raise UserError(f"--image-root {args.image_root}: folder not found")

    from vlmforge import dist
    from vlmforge.files import prepare_out_dir
    from vlmforge.model.saving import WEIGHTS
    from vlmforge.preference.build import BuildSettings, build_preferences, load_plan

    settings = BuildSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                             pairs_per_question=args.pairs_per_question, seed=args.seed,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    settings.check()
    try:
        specs = parse_task_specs(list(args.questions)) if args.questions else []
        plan = load_plan(specs, args.long_answers, image_root=args.image_root, strict=args.strict,
                         allow_absolute_paths=args.allow_absolute_paths, limit=args.limit)
    except TaskError as e:
        raise UserError(str(e)) from None
    if not plan.questions and not plan.long_answers:
        raise UserError("no usable question or long-answer rows" + (f" (skipped: {dict(plan.skipped)})" if plan.skipped else ""))
    weights = ckpt / WEIGHTS
    if not weights.is_file():
        raise UserError(f"--ckpt {ckpt}: no {WEIGHTS} (not a vlmforge checkpoint folder)")
    st = weights.stat()
    identity = {"ckpt": {"path": os.path.realpath(ckpt), "weights_size": st.st_size, "weights_mtime_ns": st.st_mtime_ns},
                "inputs": plan.inputs, "settings": asdict(settings),
                "limit": args.limit, "strict": bool(args.strict), "allow_absolute_paths": bool(args.allow_absolute_paths)}

    info = dist.init_distributed(args.device or "auto")
    device = info.device if dist.launched_by_torchrun() else dist.resolve_device(args.device)
    if dist.is_main():
        prepare_out_dir(args.out, resumable=True)

    def make_sampler():
        from vlmforge.model.saving import load_vlm
        from vlmforge.preference.sampler import ModelSampler

        model, tokenizer, _ = load_vlm(str(ckpt), device=device)
        return ModelSampler(model, tokenizer, temperature=settings.temperature, top_p=settings.top_p,
                            max_new_tokens=settings.max_new_tokens)

    try:
        manifest = build_preferences(plan, args.out, settings, make_sampler, identity=identity, strict=args.strict,
                                     info={"ckpt": str(ckpt), "world_size": dist.world_size()}, progress=not args.quiet)
    except TaskError as e:
        raise UserError(str(e)) from None
    if manifest:
        c = manifest["counts"]
        by = c["pairs_by_recipe"]
        print(f"wrote {Path(args.out) / 'pairs.jsonl'}: {c['pairs']} pairs ({by['correctness']} correctness, "
              f"{by['dropout_ntp']} dropout-NTP) from {c['questions_asked']} questions x {settings.samples} samples "
              f"(sample accuracy {c['sample_accuracy']:.3f}; no right reply: {c['questions_no_correct']}, "
              f"no wrong reply: {c['questions_no_incorrect']}) and {c['long_answers']} long answers")
        if manifest.get("dropped"):
            print("  skipped: " + ", ".join(f"{k} {v}" for k, v in manifest["dropped"].items()))
    return 0
