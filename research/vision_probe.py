"""How much of each object's shape survives in a vision tower's patch features (demo diagnosis).

A small MLP (LayerNorm -> 128 -> classes, the projector's own shape) is trained for a fixed
budget to read the shape of the object in each 3x3 cell of synthetic-world images, from
(a) the cell's raw pixels, (b) the cell's patch features of each tower given with --tower, and
(c) randomly initialised CLIP towers. Held-out accuracy side by side, as a ratio to raw pixels.

    python research/vision_probe.py --tower filter=FILTER_DIR

FILTER_DIR: a filter network trained on a 72 px world so its patch grid splits into 3x3 cells
(`vlmforge synth --set synth.image_size=72`, then `vlmforge curate train-filter ... --set
curate.train_filter.image_size=72 --set curate.train_filter.patch_size=24`).

Measured results: docs/experiments.md.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from vlmforge.arch.geometry import CLIP_MEAN_STD
from vlmforge.synth.render import render_scene
from vlmforge.synth.world import SceneSampler

SHAPES = ["circle", "square", "triangle", "star"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def world(n: int, size: int, seed: int):
    sampler = SceneSampler(SHAPES, COLORS, 1, 4)
    rng = np.random.default_rng(seed)
    scenes = [sampler.sample(rng) for _ in range(n)]
    ims = np.stack([np.asarray(render_scene(s, size)) for s in scenes]).astype(np.float32) / 255
    mean, std = (np.array(v, dtype=np.float32) for v in CLIP_MEAN_STD)
    x = torch.from_numpy(((ims - mean) / std).transpose(0, 3, 1, 2).copy())
    labels = torch.full((n, 9), len(SHAPES))  # per cell: shape index, or "empty"
    for i, s in enumerate(scenes):
        for o in s.objects:
            labels[i, o.cell[0] * 3 + o.cell[1]] = SHAPES.index(o.shape)
    return x, labels


def cells(grid_feats: torch.Tensor) -> torch.Tensor:
    """[N, g*g, D] patch features -> [N, 9, (g/3)^2 * D]: the patches of each 3x3 cell, concatenated."""
    n, p, d = grid_feats.shape
    g = int(round(p**0.5))
    k = g // 3
    if k * 3 != g:
        raise SystemExit(f"patch grid {g}x{g} does not split into 3x3 cells; use image size / patch size = 3k")
    f = grid_feats.reshape(n, 3, k, 3, k, d).permute(0, 1, 3, 2, 4, 5)
    return f.reshape(n, 9, k * k * d)


def tower_cells(path: str, x: torch.Tensor, layer: int) -> torch.Tensor:
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    kind = AutoConfig.from_pretrained(path).model_type
    cls = SiglipVisionModel if kind.startswith("siglip") else CLIPVisionModel
    tower = cls.from_pretrained(path).eval()
    with torch.no_grad():
        hs = tower(pixel_values=x, output_hidden_states=True).hidden_states[layer]
    return cells(hs[:, 1:] if cls is CLIPVisionModel else hs)


def probe(feats: torch.Tensor, labels: torch.Tensor, steps: int, n_train: int) -> float:
    torch.manual_seed(0)
    d, c = feats.shape[-1], len(SHAPES) + 1
    net = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 128), torch.nn.GELU(), torch.nn.Linear(128, c))
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (32,))
        loss = torch.nn.functional.cross_entropy(net(feats[idx]).reshape(-1, c), labels[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred, gold = net(feats[n_train:]).argmax(-1), labels[n_train:]
    has_object = gold < len(SHAPES)
    return (pred[has_object] == gold[has_object]).float().mean().item()


def random_tower(tmp: str, size: int, patch: int, width: int) -> str:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                           num_attention_heads=4, image_size=size, patch_size=patch)
    path = f"{tmp}/random_p{patch}_w{width}"
    CLIPVisionModel(cfg).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tower", action="append", default=[], metavar="NAME=DIR",
                    help="a CLIP/SigLIP (vision) folder, e.g. a filter network from `vlmforge curate train-filter`")
    ap.add_argument("--image-size", type=int, default=72, help="must be 3 x a multiple of each tower's patch size")
    ap.add_argument("--layer", type=int, default=-2, help="hidden_states index (the VLM's feature_layer)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    x, labels = world(args.images, args.image_size, seed=0)
    n_train = int(0.8 * args.images)
    s = args.image_size // 3
    raw = x.reshape(len(x), 3, 3, s, 3, s).permute(0, 2, 4, 1, 3, 5).reshape(len(x), 9, -1)
    rows = [("raw cell pixels", probe(raw, labels, args.steps, n_train))]
    with tempfile.TemporaryDirectory() as tmp:
        towers = [t.split("=", 1) for t in args.tower]
        towers += [(f"random tower, patch {p}, width {w}", random_tower(tmp, args.image_size, p, w))
                   for p, w in ((args.image_size // 3, 64), (args.image_size // 6, 128))]
        for name, path in towers:
            rows.append((name, probe(tower_cells(path, x, args.layer), labels, args.steps, n_train)))
    base = rows[0][1]
    print(f"shape of the object in each cell, MLP probe ({args.steps} steps of 32 images), held-out accuracy:")
    for name, acc in rows:
        print(f"  {name:<40} {acc:.3f}  ({acc / base:.2f}x raw pixels)")


if __name__ == "__main__":
    main()
