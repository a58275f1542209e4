"""Pretrain a vision tower on object labels: for every cell of a grid laid over the image, predict
each attribute of the object there (or "none"), and which cell it is (``position_head``).

The tower is a standard transformers ``CLIPVisionModel`` / ``SiglipVisionModel``; the heads read
its patch features at ``feature_layer`` (what the VLM will read), average-pooled onto the label
grid. The output folder is an ordinary ``save_pretrained`` folder, so a VLM takes it with
``model.vision.pretrained=<folder>``. The heads are only a training device and are not saved.

Why this exists: with no pretrained SigLIP offline, a tiny tower must learn to see from the world
itself. Contrastive image-caption training (the filter network) keeps colour and position but
drops shape, because the captions in a batch can be told apart without it; direct labels teach
every attribute quickly.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from vlmforge.arch.geometry import build_image_processor, preprocess_spec_for
from vlmforge.config import save_resolved
from vlmforge.config.recipe import Recipe
from vlmforge.config.vision import VisionPretrainConfig
from vlmforge.errors import UserError
from vlmforge.files import PathOutsideRootError, numbered_lines, resolve_inside, write_json, write_manifest
from vlmforge.imagedecode import open_image
from vlmforge.images import preprocess_batch
from vlmforge.model.tower import patch_features
from vlmforge.train.finite import require_finite
from vlmforge.train.optim import adamw_with_decay_split, warmup_cosine_scheduler

NONE = "none"  # label of an empty cell
_LOCATION_KEYS = ("position", "cell")
# Part of the input format: a 3x3 label grid's cells may be named by `position` instead of `cell`
# (row, col) -> name. `vlmforge synth` writes these names (tests/test_vision_pretrain.py checks they agree).
POSITION_NAMES_3X3 = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}  # fmt: skip

HINT = "lower vision_pretrain.lr or check the data"  # a non-finite step stops the run

def _cell_of(obj: dict, grid: int, where: str) -> int:
    if "cell" in obj:
        r, c = obj["cell"]
    elif grid == 3 and obj.get("position") in POSITION_NAMES_3X3.values():
        r, c = next(rc for rc, name in POSITION_NAMES_3X3.items() if name == obj["position"])
    else:
        raise UserError(f"{where}: object {obj} needs a 'cell': [row, col] or a 3x3 'position' name")
    if not (0 <= r < grid and 0 <= c < grid):
        raise UserError(f"{where}: cell {[r, c]} is outside the {grid}x{grid} label grid")
    return r * grid + c


def read_objects(path: str | Path, grid: int) -> tuple[list, list[list[dict]], dict]:
    """(PIL images, per-image {cell: object} lists, counts) from an objects.jsonl (or its folder).
    Unreadable images are skipped and counted, so is an image path leading out of the file's folder
    (``path_outside_root``, symlinks resolved); a malformed row is an error naming file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "objects.jsonl"
    if not path.is_file():
        raise UserError(f"labelled objects file not found: {path} (a `vlmforge synth` world has vision/objects.jsonl)")
    images, labels = [], []
    counts = {"rows": 0, "unreadable_image": 0}
    for where, line in numbered_lines(path):
        try:
            row = json.loads(line)
            image, objects = row["image"], list(row["objects"])
            image_path = resolve_inside(path.parent, image)
        except PathOutsideRootError:
            counts["rows"] += 1
            counts["path_outside_root"] = counts.get("path_outside_root", 0) + 1
            continue
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{where}: expected {{image, objects: [...]}} ({e})") from e
        counts["rows"] += 1
        try:
            with open_image(image_path) as im:
                images.append(im.convert("RGB"))
        except OSError:
            counts["unreadable_image"] += 1
            continue
        cells: dict[int, dict] = {}
        for obj in objects:
            cells[_cell_of(obj, grid, where)] = {k: str(v) for k, v in obj.items() if k not in _LOCATION_KEYS}
        labels.append([cells.get(i, {}) for i in range(grid * grid)])
    return images, labels, counts


def label_vocab(labels: list[list[dict]]) -> dict[str, list[str]]:
    """Attribute -> class names ("none" first, then the values seen, sorted)."""
    values: dict[str, set] = {}
    for cells in labels:
        for obj in cells:
            for k, v in obj.items():
                values.setdefault(k, set()).add(v)
    return {k: [NONE, *sorted(v)] for k, v in sorted(values.items())}


def label_tensor(labels: list[list[dict]], vocab: dict[str, list[str]]) -> torch.Tensor:
    """[N, cells, attributes] class indices (0 = none)."""
    index = {k: {v: i for i, v in enumerate(names)} for k, names in vocab.items()}
    return torch.tensor([[[index[k][obj.get(k, NONE)] for k in vocab] for obj in cells] for cells in labels],
                        dtype=torch.long)


def build_tower(vp: VisionPretrainConfig):
    if vp.init:  # a vision tower folder, or a whole CLIP / SigLIP model folder (its vision half)
        siglip = AutoConfig.from_pretrained(vp.init).model_type.startswith("siglip")
        cls = SiglipVisionModel if siglip else CLIPVisionModel
        return cls.from_pretrained(vp.init, attn_implementation="sdpa", dtype=torch.float32)
    common = dict(hidden_size=vp.hidden_size, intermediate_size=4 * vp.hidden_size, num_hidden_layers=vp.num_layers,
                  num_attention_heads=vp.num_heads, image_size=vp.image_size, patch_size=vp.patch_size, num_channels=3)
    if vp.image_size % vp.patch_size:
        raise UserError(f"vision_pretrain.image_size {vp.image_size} is not a multiple of patch_size {vp.patch_size}")
    if vp.arch == "siglip":
        cfg = SiglipVisionConfig(**common, vision_use_head=False)
        cfg._attn_implementation = "sdpa"
        return SiglipVisionModel(cfg)
    cfg = CLIPVisionConfig(**common)
    cfg._attn_implementation = "sdpa"
    return CLIPVisionModel(cfg)


class CellHeads(nn.Module):
    """Patch features -> per-cell logits for every attribute, and (``where``) for the cell's own index.

    The attribute heads are shared by all cells, so nothing in them needs the features to say where
    a cell is, and training wears the position embedding's trace away (a linear probe on the
    features barely beats chance at naming a cell). A pretrained ViT's patch features do carry their
    position, and the VLM needs it for "where" questions: the ``where`` head keeps it."""

    def __init__(self, dim: int, vocab: dict[str, list[str]], grid: int, where: bool = True):
        super().__init__()
        self.grid = grid
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(names)) for k, names in vocab.items()})
        self.where = nn.Linear(dim, grid * grid) if where else None

    def forward(self, patches: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        n, p, d = patches.shape
        side = math.isqrt(p)
        x = patches.transpose(1, 2).reshape(n, d, side, side)
        cells = nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # [N, cells, D]
        where = self.where(cells) if self.where is not None else None
        return {k: head(cells) for k, head in self.heads.items()}, where


def _accuracy(tower, heads, pix, y, feature_layer, bs=256) -> dict[str, float]:
    """Per attribute: accuracy on occupied cells; plus 'empty': cells correctly called empty/occupied."""
    tower.eval()
    hits = {k: 0 for k in heads.heads}
    occupied = int((y[..., 0] > 0).sum())
    empty_ok = where_ok = 0
    cell_ids = torch.arange(y.shape[1])
    with torch.inference_mode():
        for s in range(0, len(pix), bs):
            out, where = heads(patch_features(tower, pix[s : s + bs], feature_layer))
            yy = y[s : s + bs]
            if where is not None:
                where_ok += int((where.argmax(-1) == cell_ids).sum())
            occ = yy[..., 0] > 0  # the first attribute is set on every object
            for j, k in enumerate(heads.heads):
                hits[k] += int(((out[k].argmax(-1) == yy[..., j]) & occ).sum())
            first = next(iter(heads.heads))
            empty_ok += int(((out[first].argmax(-1) == 0) == ~occ).sum())
    tower.train()
    acc = {k: v / max(1, occupied) for k, v in hits.items()}
    acc["empty"] = empty_ok / max(1, y.shape[0] * y.shape[1])
    if heads.where is not None:
        acc["position"] = where_ok / max(1, y.shape[0] * y.shape[1])
    return acc


def pretrain_vision(data: str | Path, out_dir: str | Path, vp: VisionPretrainConfig, config: Recipe | None = None, log=print, progress: bool = True) -> dict:
    """Train, keep the epoch with the best held-out mean accuracy, save the tower; returns its accuracy."""
    if vp.epochs < 1 or vp.batch_size < 1:
        raise UserError("vision_pretrain.epochs and vision_pretrain.batch_size must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(vp.seed)
    t0 = time.time()
    images, labels, counts = read_objects(data, vp.grid)
    if len(images) < 8:
        raise UserError(f"only {len(images)} readable labelled images in {data}; need at least 8")
    vocab = label_vocab(labels)
    y = label_tensor(labels, vocab)
    tower = build_tower(vp)
    spec = preprocess_spec_for(tower.config.model_type, tower.config.image_size)  # as the VLM will see images
    pix = preprocess_batch(images, spec)
    del images
    heads = CellHeads(tower.config.hidden_size, vocab, vp.grid, where=vp.position_head)
    cell_ids = torch.arange(vp.grid * vp.grid)

    g = torch.Generator().manual_seed(vp.seed)
    order = torch.randperm(len(pix), generator=g)
    n_hold = max(4, int(len(order) * vp.holdout_frac))
    hold, train = order[:n_hold], order[n_hold:]
    named = [(n, p) for n, p in [*tower.named_parameters(), *heads.named_parameters()] if p.requires_grad]
    params = [p for _, p in named]
    opt = adamw_with_decay_split(named, vp.lr, vp.weight_decay, no_decay=lambda n, p: p.ndim < 2)
    steps_per_epoch = max(1, len(train) // vp.batch_size)
    total = steps_per_epoch * vp.epochs
    sched = warmup_cosine_scheduler(opt, total)
    history, best = [], None
    bar = tqdm(total=total, desc="vision-pretrain", unit="step", disable=not progress)
    for epoch in range(vp.epochs):
        perm = train[torch.randperm(len(train), generator=g)]
        losses = []
        for b in range(steps_per_epoch):
            idx = perm[b * vp.batch_size : (b + 1) * vp.batch_size]
            logits, where = heads(patch_features(tower, pix[idx], vp.feature_layer))
            loss = sum(nn.functional.cross_entropy(logits[k].flatten(0, 1), y[idx][..., j].flatten())
                       for j, k in enumerate(vocab))
            if where is not None:
                loss = loss + nn.functional.cross_entropy(where.flatten(0, 1), cell_ids.repeat(len(idx)))
            step = epoch * steps_per_epoch + b + 1
            require_finite(step, "loss", loss, hint=HINT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            require_finite(step, "gradient norm", torch.nn.utils.clip_grad_norm_(params, 1.0), hint=HINT)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
        acc = _accuracy(tower, heads, pix[hold], y[hold], vp.feature_layer)
        rec = {"epoch": epoch + 1, "loss": sum(losses) / len(losses), **{f"holdout_{k}": v for k, v in acc.items()}}
        history.append(rec)
        score = sum(acc.values()) / len(acc)
        if best is None or score > best[0]:
            best = (score, epoch + 1, {k: v.detach().clone() for k, v in tower.state_dict().items()}, acc)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", **{k: f"{v:.2f}" for k, v in acc.items()})
    bar.close()
    tower.load_state_dict(best[2])
    accuracy = best[3]
    log("vision-pretrain: held-out accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
        + f" (epoch {best[1]} of {vp.epochs})")
    tower.save_pretrained(out, safe_serialization=True)
    build_image_processor("clip" if tower.config.model_type.startswith("clip") else "siglip",
                          tower.config.image_size).save_pretrained(out)
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)
    write_json(out / "labels.json", {"grid": vp.grid, "vocab": vocab})
    if config is not None:
        save_resolved(config, out)
    write_manifest(out, "vision_pretrain", inputs=str(data), config=config,
                   counts={**counts, "images": len(pix), "train": len(train), "holdout": n_hold},
                   dropped={"unreadable_image": counts["unreadable_image"]},
                   holdout_accuracy=accuracy, best_epoch=best[1], history=history,
                   seconds=round(time.time() - t0, 1), model_class=type(tower).__name__)
    return accuracy
