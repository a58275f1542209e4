"""Inject web-crawl faults into caption samples and record each one as ground truth.

Each faulty slot replaces a clean sample (the shard count stays ``num_captions``); a slot gets at
most one fault. Duplicates and mismatched captions always point at clean samples, so a curation
stage can be scored exactly: ``faults.jsonl`` lists every faulty key, every other key is clean.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from vlmforge.config.synth import FaultConfig
from vlmforge.errors import ConfigError
from vlmforge.synth.language import caption as make_caption
from vlmforge.synth.render import encode_jpeg, encode_png, render_scene
from vlmforge.synth.world import Scene

FAULT_TYPES = (
    "mismatch",
    "exact_duplicate",
    "near_duplicate",
    "truncated_jpeg",
    "non_image",
    "empty_caption",
    "grayscale",
    "cmyk",
    "rgba",
)

# What a broken download often is: an error page served with status 200.
_NON_IMAGE_BODIES = [
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
    b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body></html>\n",
    b"<html><head><title>403 Forbidden</title></head><body><center><h1>403 Forbidden</h1></center>"
    b"<hr><center>nginx</center></body></html>\n",
    b'{"error": "rate limited", "retry_after": 60}\n',
]


@dataclass
class CleanSample:
    scene: Scene
    image: Image.Image
    jpeg: bytes
    caption: str


@dataclass
class OutSample:
    image_bytes: bytes
    caption: str
    scene: Scene | None  # what the image shows (None: not an image)
    fault: dict | None  # ground-truth record without the key (added when keys are known)


def plan_faults(n: int, fcfg: FaultConfig, rng: np.random.Generator) -> dict[int, str]:
    """slot index -> fault type, disjoint, sizes round(frac * n)."""
    sizes = {}
    for t in FAULT_TYPES:
        frac = float(getattr(fcfg, f"{t}_frac"))
        if not 0.0 <= frac <= 1.0:
            raise ConfigError(f"synth.faults.{t}_frac must be in [0, 1], got {frac}")
        sizes[t] = int(round(frac * n))
    total = sum(sizes.values())
    if total > 0.8 * n:
        raise ConfigError(
            f"synth.faults: {total} of {n} samples would be faulty; keep the fractions' sum <= 0.8 "
            "so duplicates and mismatches have clean samples to point at"
        )
    perm = rng.permutation(n)
    plan: dict[int, str] = {}
    pos = 0
    for t in FAULT_TYPES:
        for i in perm[pos : pos + sizes[t]]:
            plan[int(i)] = t
        pos += sizes[t]
    return plan


def _rgba(im: Image.Image, scene: Scene, supersample: int) -> bytes:
    """PNG with a transparent background (what a logo-style download looks like)."""
    a = np.asarray(im).astype(np.int16)
    bg = np.asarray(render_scene(replace(scene, objects=()), im.width, supersample)).astype(np.int16)
    diff = np.abs(a - bg).sum(axis=2)
    alpha = np.where(diff > 40, 255, 0).astype(np.uint8)
    rgba = np.dstack([np.asarray(im), alpha])
    return encode_png(Image.fromarray(rgba, "RGBA"))


def _jpeg_mode(im: Image.Image, mode: str, quality: int) -> bytes:
    buf = io.BytesIO()
    im.convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def apply_faults(
    clean: list[CleanSample],
    plan: dict[int, str],
    rng: np.random.Generator,
    quality: int,
    supersample: int = 4,
    caption_mix: dict[str, float] | None = None,
) -> list[OutSample]:
    """Turn clean samples into the shard contents; fault details refer to other slots by index
    (``*_index``), replaced by keys when written. Re-captioned re-uploads use ``caption_mix``."""
    n = len(clean)
    clean_slots = np.array([i for i in range(n) if i not in plan])
    if plan and len(clean_slots) == 0:
        raise ValueError("no clean samples left to duplicate")
    clean_sigs = [clean[j].scene.signature() for j in clean_slots]
    out: list[OutSample] = []
    for i, s in enumerate(clean):
        kind = plan.get(i)
        if kind is None:
            out.append(OutSample(s.jpeg, s.caption, s.scene, None))
        elif kind == "mismatch":
            sig = s.scene.signature()
            others = [j for j, js in zip(clean_slots, clean_sigs) if js != sig]
            j = int(others[int(rng.integers(len(others)))])
            f = {"fault": kind, "true_caption": s.caption, "caption_from_index": j}
            out.append(OutSample(s.jpeg, clean[j].caption, s.scene, f))
        elif kind in ("exact_duplicate", "near_duplicate"):
            j = int(clean_slots[int(rng.integers(len(clean_slots)))])
            src = clean[j]
            if kind == "exact_duplicate":
                data, cap = src.jpeg, src.caption
            else:  # a re-upload: downscaled, upscaled back, re-encoded lower, sometimes re-captioned
                side = src.image.width
                small = max(8, int(round(side * float(rng.uniform(0.7, 0.9)))))
                q = max(40, quality - int(rng.integers(10, 26)))
                im = src.image.resize((small, small), Image.Resampling.BILINEAR)
                data = encode_jpeg(im.resize((side, side), Image.Resampling.BILINEAR), quality=q)
                cap = src.caption if rng.random() < 0.5 else make_caption(src.scene, rng, caption_mix)
            f = {"fault": kind, "duplicate_of_index": j}
            if kind == "near_duplicate":
                f["transform"] = f"resize {small}px and back, jpeg quality {q}"
            out.append(OutSample(data, cap, src.scene, f))
        elif kind == "truncated_jpeg":
            keep = int(len(s.jpeg) * float(rng.uniform(0.3, 0.7)))
            f = {"fault": kind, "kept_bytes": keep, "original_bytes": len(s.jpeg)}
            out.append(OutSample(s.jpeg[:keep], s.caption, s.scene, f))
        elif kind == "non_image":
            body = _NON_IMAGE_BODIES[int(rng.integers(len(_NON_IMAGE_BODIES)))]
            out.append(OutSample(body, s.caption, None, {"fault": kind}))
        elif kind == "empty_caption":
            out.append(OutSample(s.jpeg, "", s.scene, {"fault": kind, "true_caption": s.caption}))
        elif kind == "grayscale":
            out.append(OutSample(_jpeg_mode(s.image, "L", quality), s.caption, s.scene, {"fault": kind}))
        elif kind == "cmyk":
            out.append(OutSample(_jpeg_mode(s.image, "CMYK", quality), s.caption, s.scene, {"fault": kind}))
        elif kind == "rgba":
            data = _rgba(s.image, s.scene, supersample)
            out.append(OutSample(data, s.caption, s.scene, {"fault": kind, "format": "png"}))
        else:  # pragma: no cover - plan_faults only produces FAULT_TYPES
            raise ValueError(kind)
    return out
