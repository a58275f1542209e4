"""InternVL dynamic high resolution: the tile grid (arch.tiles) and the tiles themselves (images.dynamic_tiles)."""

import numpy as np
import pytest
import transformers
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from vlmforge.arch.tiles import (
    ImageLayout,
    Tiling,
    candidate_grids,
    grid_for,
    layout_mismatch,
    tile_budget,
    tile_counts,
    tiles_per_image,
)
from vlmforge.errors import ConfigError
from vlmforge.images import dynamic_tiles

HALF_TILE_AREA = 0.5 * 448 * 448  # 100352: the area one tile "covers" in the tie rule


def test_candidates_are_every_grid_up_to_max_in_tile_count_order():
    grids = candidate_grids(1, 12)
    assert len(grids) == len(set(grids)) == sum(12 // c for c in range(1, 13))  # 35 grids
    assert all(1 <= c * r <= 12 for c, r in grids)
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)
    assert grids[:5] == ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1))
    assert candidate_grids(4, 4) == ((1, 4), (2, 2), (4, 1))


@pytest.mark.parametrize("side, grid", [
    (448, (1, 1)),
    # squares tie 1x1, 2x2, 3x3 (all ratio 1): each larger one wins while W*H > 0.5 * 448^2 * tiles
    (600, (1, 1)),    # 360,000 <= 401,408 (2x2's threshold): stays 1x1
    (900, (2, 2)),    # 810,000 > 401,408 but <= 903,168 (3x3's)
    (1000, (3, 3)),   # 1,000,000 > 903,168
    (5000, (3, 3)),   # 4x4 = 16 tiles is over the 12-tile cap
])
def test_square_images(side, grid):
    assert grid_for(side, side) == grid


def test_exact_tie_small_image_keeps_the_smaller_grid_large_image_takes_the_larger():
    # aspect 4.5 is exactly between 4x1 (4.0) and 5x1 (5.0), both 0.5 away in floats
    assert abs(900 / 200 - 4) == abs(900 / 200 - 5)
    assert 900 * 200 <= 5 * HALF_TILE_AREA and grid_for(900, 200) == (4, 1)
    assert 2700 * 600 > 5 * HALF_TILE_AREA and grid_for(2700, 600) == (5, 1)
    # max 2 tiles: 3:2 is 0.5 from 1x1 and from 2x1
    assert grid_for(300, 200, max_tiles=2) == (1, 1)  # 60,000 <= 200,704
    assert grid_for(900, 600, max_tiles=2) == (2, 1)  # 540,000 > 200,704
    # aspect 7:8 ties 1x1, 2x2, 3x3 (0.125 away) and 3x4 (0.125): the area walks up the ties in order
    assert grid_for(350, 400) == (1, 1)    # 140,000
    assert grid_for(700, 800) == (2, 2)    # 560,000 > 401,408, <= 903,168
    assert grid_for(1400, 1600) == (3, 4)  # 2,240,000 > 1,204,224 (3x4's threshold)


def test_ties_are_ties_of_floats_as_in_internvl():
    # 7:6 is exactly between 1 and 4/3 as fractions, but in floats 4/3 is nearer: no tie, 4x3 wins
    assert abs(700 / 600 - 4 / 3) < abs(700 / 600 - 1)
    assert grid_for(700, 600) == (4, 3)


def test_very_wide_and_very_tall_images_get_a_single_row_or_column():
    assert grid_for(4000, 300) == (12, 1)
    assert grid_for(300, 4000) == (1, 12)
    assert tiles_per_image(4000, 300) == tiles_per_image(300, 4000) == 13  # 12 + thumbnail
    assert grid_for(4000, 300, max_tiles=6) == (6, 1)
    assert grid_for(10_000, 1) == (12, 1) and grid_for(1, 10_000) == (1, 12)
    # exactly 2:1 ties 2x1 and 4x2: 320,000 <= 802,816 (4x2's threshold) keeps 2x1; 2,000,000 takes 4x2
    assert grid_for(800, 400) == (2, 1) and grid_for(2000, 1000) == (4, 2)


def test_max_tiles_1_means_one_tile_and_no_thumbnail():
    for w, h in [(4000, 300), (300, 4000), (2000, 2000), (10, 10)]:
        assert grid_for(w, h, max_tiles=1) == (1, 1)
        assert tiles_per_image(w, h, max_tiles=1) == 1
    assert tiles_per_image(900, 900) == 5 and tiles_per_image(900, 900, thumbnail=False) == 4
    assert tiles_per_image(448, 448) == 1  # one tile: no thumbnail


def test_min_tiles_excludes_small_grids():
    assert grid_for(448, 448, min_tiles=2) == (2, 2)  # ratio 1 is still there
    assert grid_for(448, 448, min_tiles=2, max_tiles=3) == (1, 2)  # 0.5 away; 2x1 is 1.0 away
    assert grid_for(448, 448, min_tiles=4) == (2, 2)
    assert grid_for(4000, 300, min_tiles=12, max_tiles=12) == (12, 1)


def test_multi_image_budget_is_max_tiles_over_images():
    assert [tile_budget(12, n) for n in (1, 2, 3, 4, 5, 6, 7, 12, 13, 40)] == [12, 6, 4, 3, 2, 2, 1, 1, 1, 1]
    t = Tiling()
    assert t.for_images(2) == Tiling(448, 1, 6, True)
    assert tile_counts([(4000, 300), (4000, 300)]) == [7, 7]  # 6x1 + thumbnail each
    assert tile_counts([(4000, 300)]) == [13]
    assert tile_counts([(1000, 1000)] * 3) == [5, 5, 5]  # 4 each: 2x2 + thumbnail
    assert tile_counts([(1000, 1000)] * 12) == [1] * 12  # one tile each, no thumbnail
    assert tile_counts([]) == []
    assert Tiling(min_tiles=4).for_images(6) == Tiling(448, 2, 2, True)  # min lowered to the budget


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="min_tiles"):
        Tiling(min_tiles=3, max_tiles=2)
    with pytest.raises(ConfigError, match="tile=0"):
        Tiling(tile=0)
    with pytest.raises(ValueError):
        grid_for(0, 10)
    with pytest.raises(ValueError):
        tile_budget(12, 0)


# ---- layouts --------------------------------------------------------------------------------

def test_visual_tokens_are_placeholders_plus_the_wrap_per_image():
    """4000x300 alone: 12x1 + thumbnail = 13 tiles; with a 1000x1000 the budget is 6 each: 6x1 +
    thumbnail = 7 and 2x2 + thumbnail = 5. 10 tokens per tile, a 2 + 1 token wrap."""
    tiled = ImageLayout(10, Tiling(), (7, 8), (9,))
    assert tiled.visual_tokens([(4000, 300)]) == [13 * 10 + 3]
    assert tiled.visual_tokens([(4000, 300), (1000, 1000)]) == [7 * 10 + 3, 5 * 10 + 3]
    assert tiled.visual_tokens([]) == []
    for sizes in ([(4000, 300)], [(4000, 300), (1000, 1000)], [(5, 5)] * 3):  # what expand writes
        ids = [1] + [0, 2] * len(sizes)
        assert len(tiled.expand(ids, 0, sizes)) == len(ids) - len(sizes) + sum(tiled.visual_tokens(sizes))
    wrapped = ImageLayout(10, None, (7,), (9,))  # one tile per image, whatever its size
    assert wrapped.visual_tokens([(4000, 300), (1, 1)]) == [12, 12]
    assert ImageLayout(10).visual_tokens([(4000, 300)]) == [10]


def test_only_tiling_needs_the_image_sizes():
    assert ImageLayout(4, Tiling()).needs_sizes and ImageLayout(4, Tiling()).dynamic
    wrap_only = ImageLayout(4, None, (7,), (9,))
    assert wrap_only.dynamic and not wrap_only.needs_sizes
    assert not ImageLayout(4).dynamic and not ImageLayout(4).needs_sizes


def test_layout_mismatch_compares_tiling_then_the_wrap_by_ids_or_by_text():
    tiled = ImageLayout(4, Tiling(64, 1, 4))
    rec = tiled.record()
    assert not layout_mismatch(rec, dict(rec))
    assert layout_mismatch(ImageLayout(4, Tiling(64, 1, 6)).record(), rec)
    assert layout_mismatch(ImageLayout(4).record(), rec) and layout_mismatch(ImageLayout(8, Tiling(64, 1, 4)).record(), rec)
    old = {k: v for k, v in rec.items() if k != "share_budget"}  # a record written before share_budget: shared
    assert not layout_mismatch(rec, old)
    assert layout_mismatch(ImageLayout(4, Tiling(64, 1, 4, share=False)).record(), old)
    wrapped = ImageLayout(4, Tiling(64, 1, 4), (7,), (9,)).record("<img>", "</img>")
    assert layout_mismatch(wrapped, rec) and layout_mismatch(rec, wrapped)
    assert not layout_mismatch(ImageLayout(4, Tiling(64, 1, 4), (7,), (9,)).record(), wrapped)  # ids agree, no text
    assert layout_mismatch(ImageLayout(4, Tiling(64, 1, 4), (7,), (8,)).record("<img>", "</img>"), wrapped)
    # no tokenizer on the wanting side (ids None): the wrap's text decides
    by_text = {**wrapped, "start_ids": None, "end_ids": None}
    assert not layout_mismatch(by_text, wrapped)
    assert layout_mismatch({**by_text, "end": "</image>"}, wrapped) and layout_mismatch(by_text, rec)


# ---- pixels -------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def blocks_image(cols: int, rows: int, block_w: int, block_h: int) -> Image.Image:
    """cols x rows blocks, block k (row-major) in COLOURS[k]."""
    arr = np.zeros((rows * block_h, cols * block_w, 3), np.uint8)
    for k in range(cols * rows):
        r, c = divmod(k, cols)
        arr[r * block_h:(r + 1) * block_h, c * block_w:(c + 1) * block_w] = COLOURS[k]
    return Image.fromarray(arr)


def test_each_tile_holds_its_block_row_major_and_the_thumbnail_is_the_whole_image():
    image = blocks_image(3, 2, 100, 100)  # 300x200, aspect 1.5 -> exactly 3x2
    tiles = dynamic_tiles(image, tile=64)
    assert len(tiles) == 7 and all(t.size == (64, 64) for t in tiles)
    for k, t in enumerate(tiles[:6]):
        # bicubic blends only within a few pixels of a block edge (= a tile edge here)
        inner = np.asarray(t)[4:-4, 4:-4]
        assert (inner == COLOURS[k]).all(), k
    thumb = np.asarray(tiles[6])
    np.testing.assert_array_equal(thumb, np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC)))
    for k in range(6):  # the thumbnail shows all six blocks where they are in the image
        r, c = divmod(k, 3)
        assert tuple(thumb[r * 32 + 16, int(c * 64 / 3 + 32 / 3)]) == COLOURS[k]


def test_tall_image_tiles_top_to_bottom():
    image = blocks_image(1, 3, 50, 50)  # 50x150, ratio 1/3
    # 7,500 px > 0.5 * 32^2 * 12: the tie 1x3 / 2x6 goes to 2x6, so cap at 3 tiles to keep 1x3
    assert grid_for(50, 150, 32) == (2, 6)
    tiles = dynamic_tiles(image, tile=32, max_tiles=3)
    assert len(tiles) == 4
    for k in range(3):
        assert (np.asarray(tiles[k])[4:-4, 4:-4] == COLOURS[k]).all()


def test_one_tile_has_no_thumbnail_and_thumbnail_can_be_off():
    image = blocks_image(1, 1, 40, 40)
    assert [t.size for t in dynamic_tiles(image, tile=32)] == [(32, 32)]
    wide = blocks_image(2, 1, 40, 40)
    assert len(dynamic_tiles(wide, tile=32)) == 3
    assert len(dynamic_tiles(wide, tile=32, thumbnail=False)) == 2
    assert len(dynamic_tiles(wide, tile=32, max_tiles=1)) == 1


# ---- against transformers' InternVL image processor ------------------------------------------
# InternVL checkpoints in transformers use GotOcr2's image processor (crop_to_patches); its PIL
# backend runs without torchvision.


def random_sizes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sides = np.exp(rng.uniform(np.log(16), np.log(6000), (n, 2))).astype(int) + 1
    return [(int(w), int(h)) for w, h in sides]


@pytest.mark.parametrize("min_tiles, max_tiles", [(1, 12), (1, 6), (1, 1), (1, 40), (1, 2)])
def test_grid_equals_transformers_internvl_processor(min_tiles, max_tiles):
    sizes = random_sizes(3000) + [(w, h) for w in (448, 896, 900, 2700, 4000) for h in (200, 300, 448, 600, 4000)]
    for w, h in sizes:
        want = get_optimal_tiled_canvas((h, w), (448, 448), min_tiles, max_tiles)
        assert grid_for(w, h, 448, min_tiles, max_tiles) == tuple(want), (w, h)


def test_grid_equals_transformers_when_min_tiles_is_above_one():
    for min_tiles, max_tiles in [(2, 12), (4, 12), (3, 9)]:
        for w, h in random_sizes(1000, seed=min_tiles):
            want = get_optimal_tiled_canvas((h, w), (448, 448), min_tiles, max_tiles)
            assert grid_for(w, h, 448, min_tiles, max_tiles) == tuple(want), (w, h)


def test_tile_pixels_equal_transformers_internvl_processor():
    processor = transformers.GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=True,
                                                      min_patches=1, max_patches=12,
                                                      do_rescale=False, do_normalize=False)
    rng = np.random.default_rng(3)
    for w, h in [(200, 60), (60, 200), (130, 90), (64, 64), (500, 400), (33, 47)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = processor(images=[image], return_tensors="np")["pixel_values"]
        ours = np.stack([np.asarray(t).transpose(2, 0, 1) for t in dynamic_tiles(image, tile=64)])
        np.testing.assert_array_equal(ours, want)


def test_bicubic_is_what_internvl_gets_from_pils_default_resize():
    # InternVL resizes with image.resize(size): PIL's default filter for RGB images is bicubic
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (57, 91, 3), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(image.resize((40, 30))),
                                  np.asarray(image.resize((40, 30), Image.Resampling.BICUBIC)))
