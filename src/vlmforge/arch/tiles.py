"""InternVL's dynamic high resolution: the tile grid an image is cut into, and how many tiles it costs.

An image becomes ``cols x rows`` tiles of ``tile x tile`` pixels (plus, when there is more than
one tile, a thumbnail of the whole image), each tile one pass of the vision tower. The grid is the
one InternVL's training data uses (``dynamic_preprocess``): among the grids with
``min_tiles <= cols * rows <= max_tiles``, taken in order of tile count, the grid whose aspect
ratio ``cols / rows`` is closest to the image's ``width / height`` wins; on an exact tie a later
(larger or equal) grid replaces the earlier only if the image's area exceeds half the area its
tiles cover (``W * H > 0.5 * tile^2 * cols * rows``), so a small image is not blown up.

Grids with the same tile count are taken with fewer columns first, as transformers' InternVL
image processor does. InternVL's own code takes them in Python set order; the two can differ only
on an exact tie between two grids of the same tile count, which cannot happen when 1x1 is a
candidate (min_tiles = 1, every InternVL3 recipe), so the choice is the same there.

Pure arithmetic on sizes (no pixels): the data layer counts an image's ``<image>`` tokens from it
before decoding, and :func:`vlmforge.images.dynamic_tiles` cuts the pixels with the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vlmforge.errors import ConfigError

# InternVL3's recipes: --force_image_size 448, --max_dynamic_patch 12, --min_dynamic_patch 1 (the
# default), --use_thumbnail True.
DEFAULT_TILE = 448
DEFAULT_MIN_TILES = 1
DEFAULT_MAX_TILES = 12


@dataclass(frozen=True)
class Tiling:
    """How images are tiled: tile side in pixels, tile-count range per image, thumbnail on/off."""

    tile: int = DEFAULT_TILE
    min_tiles: int = DEFAULT_MIN_TILES
    max_tiles: int = DEFAULT_MAX_TILES
    thumbnail: bool = True
    # A multi-image sample shares max_tiles among its images (InternVL's training data); False gives
    # each image the whole budget (InternVL's chat code and transformers' processor at inference).
    share: bool = True

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ConfigError(f"tiling: tile={self.tile} must be >= 1 pixel")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(f"tiling: need 1 <= min_tiles <= max_tiles, got min_tiles={self.min_tiles}, "
                              f"max_tiles={self.max_tiles}")

    def for_images(self, n_images: int) -> Tiling:
        """The tiling each image of an ``n_images``-image sample gets: the tile budget is shared,
        ``max(1, max_tiles // n_images)`` tiles each (InternVL's multi-image rule), unless ``share`` is off. A ``min_tiles``
        above that budget is lowered to it (InternVL would find no grid and fall back to 1x1; with
        min_tiles = 1, InternVL3's setting, the two agree)."""
        if not self.share:
            return self
        budget = tile_budget(self.max_tiles, n_images)
        return Tiling(self.tile, min(self.min_tiles, budget), budget, self.thumbnail, self.share)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        return grid_for(width, height, self.tile, self.min_tiles, self.max_tiles)

    def tiles(self, width: int, height: int) -> int:
        return tiles_per_image(width, height, self.tile, self.min_tiles, self.max_tiles, self.thumbnail)


def tile_budget(max_tiles: int, n_images: int) -> int:
    """Most tiles each image of an ``n_images``-image sample may take: ``max(1, max_tiles // n_images)``."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    return max(1, int(max_tiles) // int(n_images))


@lru_cache(maxsize=256)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with min_tiles <= cols * rows <= max_tiles, by tile count, then fewer columns first."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles // c + 1) if c * r >= min_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))  # stable: columns ascending within a count


def grid_for(width: int, height: int, tile: int = DEFAULT_TILE, min_tiles: int = DEFAULT_MIN_TILES,
             max_tiles: int = DEFAULT_MAX_TILES) -> tuple[int, int]:
    """(cols, rows) of the tile grid for a ``width x height`` image; see the module docstring."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height  # float arithmetic as InternVL's: exact ties are ties of these floats
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(int(min_tiles), int(max_tiles)):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and 2 * width * height > tile * tile * cols * rows:
            best = (cols, rows)
    return best


def tiles_per_image(width: int, height: int, tile: int = DEFAULT_TILE, min_tiles: int = DEFAULT_MIN_TILES,
                    max_tiles: int = DEFAULT_MAX_TILES, thumbnail: bool = True) -> int:
    """Vision-tower passes for one image: the grid's tiles, plus the thumbnail when the grid has more than one."""
    cols, rows = grid_for(width, height, tile, min_tiles, max_tiles)
    n = cols * rows
    return n + 1 if thumbnail and n > 1 else n


def tile_counts(sizes: list[tuple[int, int]], tiling: Tiling = Tiling()) -> list[int]:
    """Tiles per image of one sample whose images have these (width, height) sizes (budget shared)."""
    if not sizes:
        return []
    each = tiling.for_images(len(sizes))
    return [each.tiles(w, h) for w, h in sizes]


@dataclass(frozen=True)
class ImageLayout:
    """How the images of one sample become vision-tower passes and `<image>` placeholder ids.

    Each image is ``tiles`` tower passes (1 without tiling; its grid plus thumbnail with it), each
    pass ``tokens_per_tile`` placeholders, optionally wrapped in ``start_ids`` / ``end_ids`` (the
    token ids of InternVL's ``<img>`` / ``</img>``). The model scatters tile features into the
    placeholders in order, so a tiled image is simply several consecutive "images" to it.
    Every stage that counts or expands placeholders (sft-index, pack, the loaders, generation,
    eval, the critic) goes through this one object, so they cannot disagree."""

    tokens_per_tile: int
    tiling: Tiling | None = None
    start_ids: tuple[int, ...] = ()
    end_ids: tuple[int, ...] = ()

    def with_max_tiles(self, max_tiles: int | None) -> ImageLayout:
        """This layout with another tile budget (a meta-file source's ``max_dynamic_patch``)."""
        if self.tiling is None or max_tiles is None or int(max_tiles) == self.tiling.max_tiles:
            return self
        t = self.tiling
        return ImageLayout(self.tokens_per_tile, Tiling(t.tile, min(t.min_tiles, int(max_tiles)), int(max_tiles),
                                                        t.thumbnail, t.share), self.start_ids, self.end_ids)

    def tiles(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Tower passes per image for a sample whose images have these (width, height) sizes."""
        if self.tiling is None:
            return [1] * len(sizes)
        return tile_counts(list(sizes), self.tiling)

    def image_tokens(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Placeholder ids per image (tiles x tokens_per_tile), without the wrap."""
        return [n * self.tokens_per_tile for n in self.tiles(sizes)]

    @property
    def wrap_tokens(self) -> int:
        return len(self.start_ids) + len(self.end_ids)

    def visual_tokens(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Tokens per image in the expanded ids: its placeholders and its wrap (what an index or a
        pack counts as the sample's visual tokens)."""
        return [n + self.wrap_tokens for n in self.image_tokens(sizes)]

    def expand(self, ids, image_id: int, sizes: list[tuple[int, int]], labels=None, ignore: int = -100):
        """Replace the k-th `<image>` id of ``ids`` with image k's wrap + placeholders; ``labels``
        (same length) get ``ignore`` there. Returns ``ids`` (and ``labels``) as int64 numpy arrays.
        ValueError when the markers and ``sizes`` disagree in number."""
        ids = np.asarray(ids, dtype=np.int64)
        marks = np.flatnonzero(ids == image_id)
        if marks.size != len(sizes):
            raise ValueError(f"{marks.size} <image> marker(s) for {len(sizes)} image(s)")
        lab = None if labels is None else np.asarray(labels, dtype=np.int64)
        if not marks.size:
            return ids if lab is None else (ids, lab)
        pieces, lab_pieces, at = [], [], 0
        for m, n in zip(marks.tolist(), self.image_tokens(sizes)):
            block = np.asarray([*self.start_ids, *([image_id] * n), *self.end_ids], dtype=np.int64)
            pieces += [ids[at:m], block]
            if lab is not None:
                lab_pieces += [lab[at:m], np.full(block.size, ignore, np.int64)]
            at = m + 1
        pieces.append(ids[at:])
        out = np.concatenate(pieces)
        if lab is None:
            return out
        lab_pieces.append(lab[at:])
        return out, np.concatenate(lab_pieces)

    # ---- as recorded in a stage's manifest (sft-index, pack) and compared by the loaders ----
    def record(self, start: str | None = None, end: str | None = None) -> dict:
        """This layout as a JSON-able dict (``start`` / ``end``: the wrap's text, for people)."""
        t = self.tiling
        return {"tiles": t is not None, "tile": t.tile if t else None, "min_tiles": t.min_tiles if t else None,
                "max_tiles": t.max_tiles if t else None, "thumbnail": t.thumbnail if t else None,
                "share_budget": t.share if t else None, "tokens_per_tile": int(self.tokens_per_tile),
                "start": start, "end": end, "start_ids": list(self.start_ids), "end_ids": list(self.end_ids)}

    @classmethod
    def from_record(cls, rec: dict) -> ImageLayout:
        """The layout a :meth:`record` dict describes (a record without ``share_budget``: shared)."""
        tiling = Tiling(int(rec["tile"]), int(rec["min_tiles"]), int(rec["max_tiles"]), bool(rec["thumbnail"]),
                        bool(rec.get("share_budget", True))) if rec.get("tiles") else None
        return cls(int(rec["tokens_per_tile"]), tiling, tuple(int(i) for i in rec.get("start_ids") or ()),
                   tuple(int(i) for i in rec.get("end_ids") or ()))

    @property
    def dynamic(self) -> bool:
        """Whether an image's tokens are more than ``tokens_per_tile`` placeholders (tiles or a wrap)."""
        return self.tiling is not None or self.wrap_tokens > 0

    @property
    def needs_sizes(self) -> bool:
        """Whether counting an image's tokens needs its (width, height): only tiling does (a wrap alone
        costs the same for every image)."""
        return self.tiling is not None

    def describe(self, start: str | None = None, end: str | None = None) -> str:
        """One line naming this layout, for messages (``start`` / ``end``: the wrap's text, else its ids)."""
        t = self.tiling
        tiles = (f"tiles {t.min_tiles}..{t.max_tiles} of {t.tile} px{', thumbnail' if t.thumbnail else ''}"
                 f"{'' if t.share else ', whole budget per image'}" if t else "one tile per image")
        if start or end:
            wrap = f", wrapped in {start or ''!r} / {end or ''!r}"
        else:
            wrap = f", wrap ids {list(self.start_ids)}/{list(self.end_ids)}" if self.wrap_tokens else ""
        return f"{tiles}, {self.tokens_per_tile} tokens per tile{wrap}"


def layout_mismatch(want: dict, have: dict) -> bool:
    """Whether the layout record ``want`` (a recipe's, :meth:`ImageLayout.record`) differs from
    ``have`` (the one an index or a pack was built with): tokens per tile and tiling, then the wrap,
    by its ids, or by its text where ``want`` has no ids (a record built without a tokenizer holds
    ``start_ids`` / ``end_ids`` None)."""
    a, b = ImageLayout.from_record(want), ImageLayout.from_record(have)
    if (a.tokens_per_tile, a.tiling) != (b.tokens_per_tile, b.tiling):
        return True
    if want.get("start_ids") is None or want.get("end_ids") is None:
        return (want.get("start") or None, want.get("end") or None) != (have.get("start") or None, have.get("end") or None)
    return (a.start_ids, a.end_ids) != (b.start_ids, b.end_ids)
