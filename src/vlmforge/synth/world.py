"""The world's vocabulary and scene sampler.

A scene is a light, softly blotched background with 1-4 flat shapes, each in its own cell of a
3x3 grid (so positions are unambiguous and shapes never overlap). The blotches give every image
its own low-frequency structure, so unrelated scenes with one shape in the same place do not look
like perceptual-hash near-duplicates of each other (as they would on a flat background). Few,
very distinct shapes and colours keep it learnable by a tiny model on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmforge.config.synth import SynthConfig
from vlmforge.errors import ConfigError

# Built-in vocabulary; a recipe picks a subset.
SHAPES = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
    "black": (30, 30, 30),
    "pink": (240, 120, 180),
}
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.09, "large": 0.15}  # radius as a fraction of the image side
BG_GRID = 4  # background = a BG_GRID x BG_GRID grid of light colours, smoothly upsampled
BG_AMPLITUDE = 35  # luminance swing of the background blotches

# 3x3 grid cells, row-major; short names (answers) and phrases (captions).
CELLS = [(r, c) for r in range(3) for c in range(3)]
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}  # fmt: skip
CELL_PHRASES = {
    (0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner",
}  # fmt: skip
POSITION_NAMES = tuple(CELL_NAMES[c] for c in CELLS)

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: tuple[int, int]
    # Render-only details (do not change what a caption says).
    dx: float = 0.0  # centre jitter as a fraction of the cell
    dy: float = 0.0
    angle: float = 0.0  # degrees, small
    shade: tuple[int, int, int] = (0, 0, 0)  # per-object colour jitter

    @property
    def position(self) -> str:
        return CELL_NAMES[self.cell]

    @property
    def phrase(self) -> str:
        return CELL_PHRASES[self.cell]

    @property
    def name(self) -> str:
        """'red circle' (used as the object name in questions)."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]  # mean background colour
    bg_grid: bytes = b""  # BG_GRID x BG_GRID x 3 uint8 colours, row-major; empty = flat

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (color is None or o.color == color) for o in self.objects)

    def has(self, shape: str | None = None, color: str | None = None) -> bool:
        return self.count(shape, color) > 0

    def find(self, shape: str | None = None, color: str | None = None) -> list[Obj]:
        return [o for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color)]

    def to_dict(self) -> dict:
        """Ground truth for side files (what is in the image, not how it is drawn)."""
        return {
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "position": o.position} for o in self.objects
            ]
        }

    def signature(self) -> tuple:
        return tuple(sorted((o.shape, o.color, o.size, o.cell) for o in self.objects))


def check_vocabulary(shapes, colors, min_objects: int, max_objects: int) -> None:
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise ConfigError(f"synth.shapes: unknown {bad}; choose from {list(SHAPES)}")
    bad = [c for c in colors if c not in COLORS]
    if bad:
        raise ConfigError(f"synth.colors: unknown {bad}; choose from {list(COLORS)}")
    if len(set(shapes)) < 2 or len(set(colors)) < 2:
        raise ConfigError("synth.shapes and synth.colors need at least 2 distinct entries each")
    if not 1 <= min_objects <= max_objects <= 9:
        raise ConfigError("synth: need 1 <= min_objects <= max_objects <= 9 (3x3 grid)")


class SceneSampler:
    """Draws scenes from a seeded numpy Generator (no global random state)."""

    def __init__(self, shapes, colors, min_objects=1, max_objects=4, repeat_prob=0.3):
        check_vocabulary(shapes, colors, min_objects, max_objects)
        self.shapes = list(shapes)
        self.colors = list(colors)
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.repeat_prob = repeat_prob

    @classmethod
    def from_config(cls, cfg: SynthConfig) -> SceneSampler:
        return cls(list(cfg.shapes), list(cfg.colors), cfg.min_objects, cfg.max_objects, cfg.repeat_prob)

    def sample(self, rng: np.random.Generator) -> Scene:
        # One batch of uniforms per scene: numpy's per-call overhead dominates otherwise.
        u = iter(rng.random(13 + 13 * self.max_objects).tolist())

        def choice(seq):
            return seq[min(int(next(u) * len(seq)), len(seq) - 1)]

        def uniform(lo, hi):
            return lo + (hi - lo) * next(u)

        n = min(self.min_objects + int(next(u) * (self.max_objects - self.min_objects + 1)), self.max_objects)
        order = sorted(range(len(CELLS)), key=lambda _: next(u))  # random permutation of the cells
        cells = [CELLS[i] for i in order[:n]]
        objs: list[Obj] = []
        for cell in cells:
            shape = choice(self.shapes)
            color = choice(self.colors)
            repeat, which, half, both = next(u), next(u), next(u), next(u)
            if objs and repeat < self.repeat_prob:  # repeats make counting questions non-trivial
                src = objs[min(int(which * len(objs)), len(objs) - 1)]
                if both < 0.5:
                    shape, color = src.shape, src.color
                elif half < 0.5:
                    shape = src.shape
                else:
                    color = src.color
            objs.append(
                Obj(
                    shape=shape,
                    color=color,
                    size=choice(SIZES),
                    cell=cell,
                    dx=uniform(-0.12, 0.12),
                    dy=uniform(-0.12, 0.12),
                    angle=uniform(-12, 12),
                    shade=(int(uniform(-12, 13)), int(uniform(-12, 13)), int(uniform(-12, 13))),
                )
            )
        objs.sort(key=lambda o: o.cell)  # reading order: captions list objects top-left first
        bg = (int(uniform(215, 246)), int(uniform(215, 246)), int(uniform(215, 246)))
        b = rng.random((BG_GRID**2, 4))  # per blotch: luminance swing + a slight tint
        grid = np.array(bg) + (2 * b[:, :1] - 1) * BG_AMPLITUDE + (16 * b[:, 1:] - 8)
        grid = np.clip(grid, 150, 255).astype(np.uint8)
        return Scene(objects=tuple(objs), background=bg, bg_grid=grid.tobytes())


def scene_from_dict(d: dict) -> Scene:
    """Inverse of ``Scene.to_dict`` (render details at defaults)."""
    inv = {v: k for k, v in CELL_NAMES.items()}
    objs = tuple(Obj(o["shape"], o["color"], o["size"], inv[o["position"]]) for o in d["objects"])
    return Scene(objects=objs, background=(245, 245, 245))


__all__ = [
    "CELLS",
    "CELL_NAMES",
    "CELL_PHRASES",
    "COLORS",
    "NUMBER_WORDS",
    "Obj",
    "POSITION_NAMES",
    "SHAPES",
    "SHAPE_PLURALS",
    "SIZES",
    "Scene",
    "SceneSampler",
    "scene_from_dict",
]
