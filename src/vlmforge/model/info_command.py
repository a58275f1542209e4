"""Show a model's size without weights: the recipe's architecture is built on the meta device.

Prints parameters per component (trainable / frozen, from the recipe's freeze policy), visual
tokens per image, the patch grid and training FLOPs per token and per image (formula printed) -
the same figures the trainer's per-step MFU counts (vlmforge.model.flops), at a span of
pack.max_len tokens (causal attention over a full pack; document attention spans are shorter). Architectures
come from the shipped config files (model.vision.preset / model.llm.preset), so this works
offline for the real Open-Qwen2VL and InternVL3-style recipes.

Example:
  vlmforge model-info --recipe open_qwen2vl/model
  vlmforge model-info --recipe open_qwen2vl/model --set model.projector.pool_size=null --json
"""

from __future__ import annotations

import argparse

from vlmforge.config.recipe import Recipe

HELP = "parameters per component, visual tokens per image and training FLOPs of a recipe's model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vlmforge.clitools import add_recipe_args

    add_recipe_args(parser, default="tiny/model")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def model_info(cfg: Recipe) -> dict:
    """Everything model-info prints, as a dict (built on the meta device: no memory, no weights)."""
    from vlmforge.model.build import build_meta_vlm
    from vlmforge.model.flops import count_parameters, training_flops

    model = build_meta_vlm(cfg.model)
    counts = {name: count_parameters(getattr(model, name)) for name in ("vision", "projector", "llm")}
    flops = training_flops(model, int(cfg.pack.max_len))
    return {
        "recipe": cfg.name,
        "vision": {"preset": cfg.model.vision.preset, "feature_layer": model.feature_layer, "image_size": model.image_size},
        "llm": {"preset": cfg.model.llm.preset},
        "projector": cfg.model.projector.kind,
        "params": {k: {"trainable": v.trainable, "frozen": v.frozen, "total": v.total} for k, v in counts.items()},
        "params_total": sum(v.total for v in counts.values()),
        "params_trainable": sum(v.trainable for v in counts.values()),
        "patch_grid": model.patch_grid,
        "visual_tokens_per_image": model.tokens_per_image,
        "attention": cfg.model.attention,
        "positions": cfg.model.positions,
        "flops": flops,
    }


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def run(args: argparse.Namespace) -> int:
    import json

    from vlmforge.clitools import recipe_from_args

    info = model_info(recipe_from_args(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"recipe {info['recipe']}: {info['vision']['preset']} -> {info['projector']} -> {info['llm']['preset']}")
    print(f"{'component':<12}{'trainable':>14}{'frozen':>14}{'total':>14}")
    for name, c in info["params"].items():
        print(f"{name:<12}{_fmt(c['trainable']):>14}{_fmt(c['frozen']):>14}{_fmt(c['total']):>14}")
    print(f"{'all':<12}{_fmt(info['params_trainable']):>14}{'':>14}{_fmt(info['params_total']):>14}")
    g = info["patch_grid"]
    print(f"image {info['vision']['image_size']} px -> {g}x{g} patches (feature layer {info['vision']['feature_layer']}) "
          f"-> {info['visual_tokens_per_image']} visual tokens per image")
    print(f"attention {info['attention']}, positions {info['positions']}")
    f = info["flops"]
    print(f"training FLOPs per LLM token at a {f['context']}-token attention span: {_fmt(f['llm_per_token'])} "
          f"= matmuls {_fmt(f['llm_matmul_per_token'])} (N = {_fmt(f['llm_params'])} non-embedding params + head) "
          f"+ attention {_fmt(f['attention_per_token'])}")
    print(f"training FLOPs per image (tower + projector): {_fmt(f['per_image'])}; "
          f"per visual token incl. its share of the image: {_fmt(f['per_visual_token'])}")
    print(f"formula: {f['formula']}")
    return 0
