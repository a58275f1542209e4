"""Draw a scene with PIL and encode it. Deterministic: same scene + size -> same bytes."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from vlmforge.synth.world import BG_GRID, COLORS, SIZE_FRACTION, Obj, Scene


def _clip(v: int) -> int:
    return max(0, min(255, v))


def _polygon(cx: float, cy: float, r: float, angle_deg: float, points: list[tuple[float, float]]):
    """Rotate unit-circle points by angle and place them at (cx, cy) with radius r."""
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in points]


def _unit_star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        rad = 1.0 if i % 2 == 0 else inner
        t = -math.pi / 2 + i * math.pi / n
        pts.append((rad * math.cos(t), rad * math.sin(t)))
    return pts


_UNIT = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)],
    "star": _unit_star(),
    "cross": [
        (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
        (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3),
    ],
}  # fmt: skip


def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, side: int, fill=None) -> None:
    cell = side / 3
    cx = (o.cell[1] + 0.5 + o.dx) * cell
    cy = (o.cell[0] + 0.5 + o.dy) * cell
    r = SIZE_FRACTION[o.size] * side
    base = COLORS[o.color]
    if fill is None:
        fill = tuple(_clip(c + s) for c, s in zip(base, o.shade))
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(cx, cy, r, o.angle, _UNIT[o.shape]), fill=fill)


def _background(scene: Scene, size: int) -> Image.Image:
    if scene.bg_grid:
        grid = np.frombuffer(scene.bg_grid, dtype=np.uint8).reshape(BG_GRID, BG_GRID, 3)
        return Image.fromarray(grid, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    return Image.new("RGB", (size, size), scene.background)


def render_scene(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """RGB image of ``size`` x ``size``. Shapes are drawn at ``supersample`` x on black with a
    coverage mask, box-downsampled (premultiplied colour + coverage) and laid over the background
    made directly at the output size: smooth edges at a fraction of the cost of a big canvas."""
    k = max(1, supersample)
    big = size * k
    bg = _background(scene, size)
    if not scene.objects:
        return bg
    colour = Image.new("RGB", (big, big), (0, 0, 0))
    mask = Image.new("L", (big, big), 0)
    draw_c, draw_m = ImageDraw.Draw(colour), ImageDraw.Draw(mask)
    for o in scene.objects:
        _draw_obj(draw_c, o, big)
        _draw_obj(draw_m, o, big, fill=255)
    if k > 1:
        colour, mask = colour.reduce(k), mask.reduce(k)
    # out = background * (1 - coverage) + premultiplied colour, all in PIL's C code
    uncovered = ImageChops.invert(mask)
    return ImageChops.add(ImageChops.multiply(bg, Image.merge("RGB", (uncovered,) * 3)), colour)


def encode_jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    # No optimize/progressive: plain baseline encoding is byte-stable for a given libjpeg.
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
