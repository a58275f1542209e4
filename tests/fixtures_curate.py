"""A tiny hand-made caption world for the curation tests (independent of the synth stage).

Images: one coloured shape on a plain background; caption names colour and shape. Faults, listed
in ``faults.jsonl`` like the synthetic world's: mismatched captions, exact duplicates (same bytes +
caption under a new key), near duplicates (re-encoded, shifted by a pixel), a damaged image.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def draw(color: str, shape: str, size: int = 48, shift: int = 0, layout: int = 0):
    """The shape plus a distinct random layout (position, size, two grey bars) per ``layout`` seed."""
    from PIL import Image, ImageDraw

    r = random.Random(layout)
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(im)
    for _ in range(2):  # grey bars make every layout's perceptual hash different
        x, y = r.randrange(0, size - 12), r.randrange(0, size - 12)
        d.rectangle([x, y, x + r.randrange(6, 12), y + r.randrange(20, 40)], fill=(90, 90, 90))
    w = r.randrange(14, 22)
    a, c = r.randrange(0, size - w) + shift, r.randrange(0, size - w) + shift
    if shape == "circle":
        d.ellipse([a, c, a + w, c + w], fill=COLORS[color])
    elif shape == "square":
        d.rectangle([a, c, a + w, c + w], fill=COLORS[color])
    else:
        d.polygon([(a + w // 2, c), (a, c + w), (a + w, c + w)], fill=COLORS[color])
    return im


def jpeg(im, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_world(out: Path, n: int = 48, per_shard: int = 16, seed: int = 0, n_mismatch: int = 4,
               n_exact: int = 3, n_near: int = 2, n_corrupt: int = 1) -> dict:
    """Write shards + faults.jsonl; returns {"dir", "faults": {key: kind}, "n"}."""
    from vlmforge.shards import ShardWriter

    rng = random.Random(seed)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    base = []
    for i in range(n):
        c, s = combos[i % len(combos)]
        layout = seed * 100_003 + i
        base.append({"img": jpeg(draw(c, s, layout=layout)), "cap": f"a {c} {s}", "c": c, "s": s, "layout": layout})
    faults: dict[str, str] = {}
    records = []
    samples = []
    for i, b in enumerate(base):
        samples.append({"img": b["img"], "cap": b["cap"], "fault": None, "uid": f"{i:032x}"})
    # mismatched captions: caption of another colour+shape
    for i in rng.sample(range(n), n_mismatch):
        other = next(x for x in combos if x != (base[i]["c"], base[i]["s"]))
        samples[i]["cap"] = f"a {other[0]} {other[1]}"
        samples[i]["fault"] = "mismatch"
    clean = [i for i in range(n) if samples[i]["fault"] is None]
    extra = []
    for j, i in enumerate(rng.sample(clean, n_exact + n_near)):
        if j < n_exact:
            extra.append({"img": samples[i]["img"], "cap": samples[i]["cap"], "fault": "exact_duplicate",
                          "uid": f"{n + j:032x}", "of": i})
        else:
            b = base[i]
            extra.append({"img": jpeg(draw(b["c"], b["s"], shift=1, layout=b["layout"]), quality=80), "cap": b["cap"],
                          "fault": "near_duplicate", "uid": f"{n + j:032x}", "of": i})
    samples += extra
    for j in range(n_corrupt):
        samples.append({"img": b"<html>not an image</html>", "cap": "broken", "fault": "non_image",
                        "uid": f"{n + 100 + j:032x}"})
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    with ShardWriter(out, samples_per_shard=per_shard, timestamps=False) as w:
        for s in samples:
            key = w.next_key()
            keys.append(key)
            w.write(key, s["img"], s["cap"], {"uid": s["uid"]})
            if s["fault"]:
                faults[key] = s["fault"]
                rec = {"key": key, "fault": s["fault"]}
                if "of" in s:
                    rec["duplicate_of_key"] = keys[s["of"]]
                records.append(rec)
    (out / "faults.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"dir": out, "faults": faults, "n": len(samples)}


def tiny_contrastive(arch: str, tok_dir: str, out: Path) -> Path:
    """A tiny random CLIP / SigLIP (the filter network's architecture, 32 px) saved with its
    tokenizer and image processor, as `curate score` loads a model folder."""
    import torch

    from vlmforge.config.curate import TrainFilterConfig
    from vlmforge.curate.train_filter import add_eos_postprocessor, build_image_processor, build_model
    from vlmforge.text.tokenization import load_tokenizer

    tf = TrainFilterConfig(arch=arch, image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                           embed_dim=16, max_text_len=16)
    tok = load_tokenizer(tok_dir)
    add_eos_postprocessor(tok)
    torch.manual_seed(0)
    build_model(tf, tok).save_pretrained(out)
    tok.save_pretrained(out)
    build_image_processor(arch, 32).save_pretrained(out)
    return out
