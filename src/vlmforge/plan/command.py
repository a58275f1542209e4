"""Plan a training run before renting GPUs: memory per GPU and wall time / GPU-hours of a recipe.

Memory per GPU: fp32 weights, gradients and optimizer states under FSDP2 sharding (the recipe's
train.optimizer), the gathered bf16 copies, activations with and without activation
checkpointing for train.micro_batch_size rows of the stage's max_len, and the LM head's logits
with and without the chunked loss (train.loss_chunk_tokens), with a reserve for the CUDA context,
NCCL and fragmentation. Time: model FLOPs per token (as `vlmforge model-info` counts them, model
built on the meta device) x --tokens at an MFU: --mfu, else a bench/gpu_check.sh result's
(--measured, or gpu_check_out/gpu_check.json; the variant with the recipe's train.compile and
chunked loss), else an assumed 0.35. Every assumption is printed with the plan; the formulas are
in vlmforge/plan/estimate.py.

Examples:
  vlmforge plan --recipe open_qwen2vl/pretrain --gpus 8 --gpu a100-40g --tokens 5B
  vlmforge plan --recipe open_qwen2vl/pretrain --gpus 8 --gpu a100-40g --tokens 5B --gpu-hours 220
  vlmforge plan --recipe open_qwen2vl/sft --gpus 8 --gpu h100 --tokens 2B --mfu 0.4 --set train.micro_batch_size=2
"""

from __future__ import annotations

import argparse

HELP = "memory per GPU and GPU-hours of a training recipe (FSDP2, checkpointing, chunked loss, MFU)"
GPU_NAMES = ("a100-40g", "a100-80g", "h100", "h200", "b200")  # vlmforge.plan.hardware.GPUS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vlmforge.clitools import add_recipe_args

    add_recipe_args(parser, default="open_qwen2vl/pretrain")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the run (FSDP2 shards over all of them)")
    parser.add_argument("--gpu", required=True, choices=GPU_NAMES, help="GPU type (memory and dense bf16 peak)")
    parser.add_argument("--tokens", required=True, help="tokens to train on, e.g. 5B, 500M, 1.2e9")
    parser.add_argument("--mfu", type=float, help="model FLOPs utilisation to assume, 0-1 (default: measured, else 0.35)")
    parser.add_argument("--measured", metavar="PATH", help="a bench/gpu_check.sh result JSON to read the MFU from "
                                                           "(default: gpu_check_out/gpu_check.json if present)")
    parser.add_argument("--gpu-hours", type=float, help="GPU-hours a run of --tokens took (e.g. a published one): "
                                                        "prints the MFU they imply")
    parser.add_argument("--visual-fraction", type=float, help="share of the tokens that are image tokens "
                                                              "(default: the packed data's manifest, else assumed)")
    parser.add_argument("--attention-kernel", choices=["flash", "sdpa", "eager"],
                        help="default: flash for model.attn_backend auto / flash_attention_2, else sdpa")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def run(args: argparse.Namespace) -> int:
    import json

    from vlmforge.clitools import recipe_from_args
    from vlmforge.plan.planner import format_plan, make_plan, parse_count

    tokens = parse_count(args.tokens)
    plan = make_plan(recipe_from_args(args), gpus=args.gpus, gpu=args.gpu, tokens=tokens, mfu=args.mfu,
                     measured=args.measured, gpu_hours=args.gpu_hours, visual_fraction=args.visual_fraction,
                     attention_kernel=args.attention_kernel)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
