"""Show a model's size without weights: the recipe's architecture is built on the meta device.

Prints parameters per component (trainable / frozen, from the recipe's freeze policy), visual
tokens per image, the patch grid and training FLOPs per token and per image (formula printed) -
the same figures the trainer's per-step MFU counts (vlmforge.model.flops), at a span of
pack.max_len tokens (causal attention over a full pack; document attention spans are shorter). Architectures
come from the shipped config files (model.vision.preset / model.llm.preset), so this works
offline for the real Open-Qwen2VL and InternVL3-style recipes.

With ``--image-size WxH`` (repeatable, or a comma list) it also shows what images of those sizes
cost under the recipe's ``model.images`` layout: each image's tile grid, its tiles (grid plus
thumbnail, InternVL's dynamic high resolution; 1 when the recipe does not tile) and its visual
tokens (tiles x tokens per tile), plus the ``model.images.start`` / ``end`` wrap tokens when a
tokenizer is at hand (``--tokenizer``, or the recipe's ``tokenizer.path`` when it is a local folder).
Several sizes are also shown together as one sample's images, which share the tile budget.

Example:
  vlmforge model-info --recipe open_qwen2vl/model
  vlmforge model-info --recipe open_qwen2vl/model --set model.projector.pool_size=null --json
  vlmforge model-info --recipe internvl3/sft --image-size 1024x768 --image-size 448x448,2000x500
"""

from __future__ import annotations

import argparse
import os
import re

from vlmforge.config.recipe import Recipe
from vlmforge.errors import UserError

HELP = "parameters per component, visual tokens per image and training FLOPs of a recipe's model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vlmforge.clitools import add_recipe_args

    add_recipe_args(parser, default="tiny/model")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--image-size", dest="image_sizes", action="append", default=[], metavar="WxH[,WxH...]",
                        help="also show tiles and visual tokens for images of this size (repeatable or a comma list)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or hub id to count the wrap tokens (model.images.start / end) with; "
                             "default: the recipe's tokenizer.path when it is a local folder")


_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_sizes(values: list[str]) -> list[tuple[int, int]]:
    """``["1024x768", "448x448,2000x500"]`` -> [(1024, 768), (448, 448), (2000, 500)]; UserError naming a bad one."""
    out = []
    for value in values:
        for part in value.split(","):
            m = _SIZE.match(part)
            if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
                raise UserError(f"--image-size {part.strip()!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x768")
            out.append((int(m.group(1)), int(m.group(2))))
    return out


def image_costs(cfg: Recipe, model, sizes: list[tuple[int, int]], tokenizer=None) -> dict:
    """What images of these (width, height) sizes cost under the recipe's layout: per image alone
    (the whole tile budget), and all together as one sample (the budget shared)."""
    from vlmforge.arch.geometry import layout_from

    images = cfg.model.images
    layout = layout_from(images, model.tokens_per_image, model.image_size, tokenizer, wrap=tokenizer is not None)
    wrap = layout.wrap_tokens if tokenizer is not None or not (images.start or images.end) else None

    def sample(group: list[tuple[int, int]]) -> list[dict]:
        """Each image of a sample whose images have these sizes (the budget shared unless share_budget is off)."""
        each = layout.tiling.for_images(len(group)) if layout.tiling is not None else None
        rows = []
        for size, tiles, visual, tokens in zip(group, layout.tiles(group), layout.image_tokens(group),
                                               layout.visual_tokens(group)):
            grid = each.grid(*size) if each is not None else (1, 1)
            rows.append({"size": list(size), "grid": list(grid), "tiles": tiles,
                         "thumbnail": tiles > grid[0] * grid[1], "visual_tokens": visual,
                         "tokens": None if wrap is None else tokens})
        return rows

    t = layout.tiling
    out = {
        "tiles": bool(images.tiles), "tile": model.image_size if images.tiles else None,
        "min_tiles": images.min_tiles if images.tiles else None, "max_tiles": images.max_tiles if images.tiles else None,
        "thumbnail": bool(images.thumbnail) if images.tiles else None,
        "share_budget": bool(images.share_budget) if images.tiles else None, "tokens_per_tile": layout.tokens_per_tile,
        "start": images.start, "end": images.end, "wrap_tokens": wrap,
        "images": [sample([s])[0] for s in sizes],
    }
    if len(sizes) > 1:
        each = t.for_images(len(sizes)) if t is not None else None
        together = sample(sizes)
        out["sample"] = {"budget_per_image": each.max_tiles if each is not None else None, "images": together,
                         "tiles": sum(r["tiles"] for r in together),
                         "visual_tokens": sum(r["visual_tokens"] for r in together),
                         "tokens": None if wrap is None else sum(r["tokens"] for r in together)}
    return out


def wrap_tokenizer(cfg: Recipe, path: str | None):
    """The tokenizer the wrap is counted with: ``path``, else the recipe's when it is a local folder, else None."""
    from vlmforge.text.tokenization import load_tokenizer

    if path:
        return load_tokenizer(path, key="--tokenizer")
    own = cfg.tokenizer.path
    if own and os.path.isdir(str(own)):
        return load_tokenizer(own)
    return None


def model_info(cfg: Recipe, sizes: list[tuple[int, int]] | None = None, tokenizer=None) -> dict:
    """Everything model-info prints, as a dict (built on the meta device: no memory, no weights);
    with ``sizes``, an ``image_costs`` entry for them."""
    from vlmforge.model.build import build_meta_vlm
    from vlmforge.model.flops import count_parameters, training_flops

    model = build_meta_vlm(cfg.model)
    counts = {name: count_parameters(getattr(model, name)) for name in ("vision", "projector", "llm")}
    flops = training_flops(model, int(cfg.pack.max_len))
    info = {
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
    if sizes:
        info["image_costs"] = image_costs(cfg, model, sizes, tokenizer)
    return info


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def run(args: argparse.Namespace) -> int:
    import json

    from vlmforge.clitools import recipe_from_args

    sizes = parse_sizes(args.image_sizes)
    cfg = recipe_from_args(args)
    tok = wrap_tokenizer(cfg, args.tokenizer) if sizes and (cfg.model.images.start or cfg.model.images.end) else None
    info = model_info(cfg, sizes, tok)
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
    if sizes:
        print_image_costs(info["image_costs"])
    return 0


def print_image_costs(c: dict) -> None:
    if c["tiles"]:
        shared = "shared over a sample's images" if c.get("share_budget", True) else "each image of a sample, not shared"
        print(f"images: tiles of {c['tile']} px, {c['min_tiles']}..{c['max_tiles']} per image "
              f"({shared}), thumbnail {'on' if c['thumbnail'] else 'off'}, "
              f"{c['tokens_per_tile']} visual tokens per tile")
    else:
        print(f"images: not tiled (each image resized to one tile), {c['tokens_per_tile']} visual tokens per image")
    if c["start"] or c["end"]:
        counted = f"{c['wrap_tokens']} token(s)" if c["wrap_tokens"] is not None else \
            "not counted below: the recipe's tokenizer.path is not a local folder; give --tokenizer"
        print(f"wrap: {c['start']!r} ... {c['end']!r} around each image, {counted}")

    def line(r: dict) -> str:
        w, h = r["size"]
        cols, rows = r["grid"]
        thumb = " + thumbnail" if r["thumbnail"] else ""
        total = f", {r['tokens']} with the wrap" if r["tokens"] is not None and c["wrap_tokens"] else ""
        return (f"{w}x{h}: grid {cols}x{rows} = {cols * rows} tile(s){thumb} -> {r['tiles']} tile(s), "
                f"{r['visual_tokens']} visual tokens{total}")

    for r in c["images"]:
        print("  " + line(r))
    s = c.get("sample")
    if s:
        budget = f" (at most {s['budget_per_image']} tiles each)" if s["budget_per_image"] is not None else ""
        print(f"together in one sample{budget}:")
        for r in s["images"]:
            print("  " + line(r))
        total = f", {s['tokens']} with the wraps" if s["tokens"] is not None and c["wrap_tokens"] else ""
        print(f"  total {s['tiles']} tile(s), {s['visual_tokens']} visual tokens{total}")
