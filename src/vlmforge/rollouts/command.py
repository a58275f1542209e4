"""Make process reward model training data from a policy's own solutions (VisualPRM's recipe).

For each question (eval task rows with known answers, asked 0-shot exactly as `vlmforge eval` asks
them), --solutions replies are sampled at --temperature and cut into steps on blank lines (merged
to at most --max-steps). From the reply prefix ending at each step, the policy continues
--rollouts times; the step's mc is the fraction of those full replies the kind's scorer judges
correct, and its label is + when mc > 0, else -. The last step's mc is the solution's own
correctness (1.0 or 0.0). A prefix shared by several solutions of a question is continued once.

Cost: questions x solutions generations, plus at most questions x solutions x (steps - 1) x
rollouts continuations (fewer where prefixes repeat), each up to --max-new-tokens tokens.

Writes OUT/prm.json (LLaVA json, one VisualPRM conversation per solution: what `vlmforge
sft-index` reads to train the critic with train.stage=prm), OUT/steps.jsonl (per solution: steps,
mc, labels, correct, extracted, answer) and OUT/manifest.json (counts, share of '-' steps,
questions all right / all wrong, skipped rows with file:line, image_root). Under torchrun the
parts are shared over ranks; a killed run resumes when run again with the same arguments (same
output as one uninterrupted run); other arguments in the same folder are refused.

Examples:
  vlmforge prm-data --policy runs/sft/final --questions world/questions/math.jsonl --out runs/prm
  torchrun --nproc-per-node 8 -m vlmforge prm-data --policy C --questions math:train.jsonl --out P
  vlmforge sft-index --input runs/prm/prm.json --image-root ROOT --tokenizer TOK --out runs/prm_idx
      (ROOT: the manifest's image_root)
"""

from __future__ import annotations

import argparse

HELP = "make process reward data: sampled solutions, each step labelled by Monte Carlo rollouts (VisualPRM)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="CKPT",
                        help="the model that writes and continues the solutions (a vlmforge checkpoint folder)")
    parser.add_argument("--questions", nargs="+", required=True, metavar="[KIND:]FILE",
                        help="question files with answers: FILE (kind math), KIND:FILE, NAME=KIND:FILE or a .yaml "
                             "task file (as `vlmforge eval --tasks`)")
    parser.add_argument("--out", required=True, help="output folder (a run in it resumes; another run's is refused)")
    parser.add_argument("--image-root", help="folder the rows' image paths are relative to (default: each file's folder)")
    parser.add_argument("--solutions", type=int, default=4, help="solutions sampled per question (default 4)")
    parser.add_argument("--rollouts", type=int, default=8, help="continuations from each step's prefix (default 8)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--max-steps", type=int, default=12, help="steps per solution at most; more are merged (default 12)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="new tokens per generation, a solution or a continuation (default 128)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per generate call (default 64)")
    parser.add_argument("--questions-per-part", type=int, default=16,
                        help="questions per part file, the unit of resuming and of sharding over ranks (default 16)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed (default 0); each generation draws from its own seed: this one, the "
                             "question's id and the solution's number (a continuation: the prefix and its number)")
    parser.add_argument("--limit", type=int, help="first N questions of each file")
    parser.add_argument("--allow-absolute-paths", action="store_true", help="accept absolute image paths in the rows")
    parser.add_argument("--no-strict", action="store_true",
                        help="skip bad rows and images and count them with file:line (default: stop at the first)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a previous prm-data run in --out and start again")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _with_default_kind(spec: str) -> str:
    """FILE and NAME=FILE mean kind math."""
    name, eq, rest = spec.rpartition("=")
    if ":" in rest or rest.endswith((".yaml", ".yml")):
        return spec
    return f"{name}{eq}math:{rest}"


def run(args: argparse.Namespace) -> int:
    import os
    from dataclasses import asdict
    from pathlib import Path

    from vlmforge.errors import UserError
    from vlmforge.eval.items import TaskError
    from vlmforge.eval.specs import BUILTIN_SYNTH, parse_task_specs

    builtin = [q for q in args.questions if q == "synth" or q in BUILTIN_SYNTH]
    if builtin:
        raise UserError(f"--questions {builtin[0]}: the built-in synth-* tasks are the benchmarks; step labels must "
                        "come from training-split questions, e.g. WORLD/questions/math.jsonl")
    ckpt = Path(args.policy)
    if not ckpt.is_dir():
        raise UserError(f"--policy {ckpt}: checkpoint folder not found")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.image_root and not Path(args.image_root).is_dir():
        raise UserError(f"--image-root {args.image_root}: folder not found")

    from vlmforge import dist
    from vlmforge.files import prepare_out_dir
    from vlmforge.model.saving import WEIGHTS
    from vlmforge.rollouts.build import IDENTITY_FILE, PrmSettings, build_prm_data, clear_run, load_questions

    settings = PrmSettings(solutions=args.solutions, rollouts=args.rollouts, temperature=args.temperature,
                           top_p=args.top_p, max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, questions_per_part=args.questions_per_part, seed=args.seed)
    settings.check()
    strict = not args.no_strict
    try:
        specs = parse_task_specs([_with_default_kind(q) for q in args.questions])
        for spec in specs:
            if not Path(spec.path).is_file():
                raise UserError(f"--questions {spec.path}: file not found")
        plan = load_questions(specs, image_root=args.image_root, strict=strict,
                              allow_absolute_paths=args.allow_absolute_paths, limit=args.limit)
    except TaskError as e:
        raise UserError(str(e)) from None
    if not plan.questions:
        raise UserError("no usable question rows" + (f" (skipped: {dict(plan.skipped)})" if plan.skipped else ""))
    weights = ckpt / WEIGHTS
    if not weights.is_file():
        raise UserError(f"--policy {ckpt}: no {WEIGHTS} (not a vlmforge checkpoint folder)")
    st = weights.stat()
    identity = {"policy": {"path": os.path.realpath(ckpt), "weights_size": st.st_size, "weights_mtime_ns": st.st_mtime_ns},
                "inputs": plan.inputs, "image_root": plan.image_root, "settings": asdict(settings), "limit": args.limit,
                "strict": strict, "allow_absolute_paths": bool(args.allow_absolute_paths)}

    info = dist.init_distributed(args.device or "auto")
    device = info.device if dist.launched_by_torchrun() else dist.resolve_device(args.device)
    if dist.is_main():
        out = Path(args.out)
        prepare_out_dir(out, overwrite=args.overwrite, resumable=(out / IDENTITY_FILE).is_file())
        if args.overwrite:
            clear_run(out)

    def make_policy():
        from vlmforge.model.saving import load_vlm
        from vlmforge.rollouts.policy import ModelPolicy

        model, tokenizer, _ = load_vlm(str(ckpt), device=device)
        return ModelPolicy(model, tokenizer, temperature=settings.temperature, top_p=settings.top_p,
                           max_new_tokens=settings.max_new_tokens)

    try:
        manifest = build_prm_data(plan, args.out, settings, make_policy, identity=identity, strict=strict,
                                  info={"policy": str(ckpt), "world_size": dist.world_size()}, progress=not args.quiet)
    except TaskError as e:
        raise UserError(str(e)) from None
    if manifest:
        c = manifest["counts"]
        g = c["generations"]
        print(f"wrote {Path(args.out) / 'prm.json'}: {c['solutions']} solutions, {c['steps']} steps "
              f"({c['minus_share']:.1%} labelled -) from {c['questions_asked']} questions x {settings.solutions} "
              f"(solution accuracy {c['solution_accuracy']:.3f}; all right: {c['questions_all_correct']}, all wrong: "
              f"{c['questions_all_wrong']}); {g['solutions']} solutions + {g['rollouts']} rollouts generated "
              f"({g['rollouts_deduplicated']} saved by shared prefixes)")
        if manifest.get("dropped"):
            print("  skipped: " + ", ".join(f"{k} {v}" for k, v in manifest["dropped"].items()))
    return 0
