"""V2PE with dynamic tiles: in training one random step is drawn per image and shared by all its
tiles (grid and thumbnail), as InternVL draws one per <img> span; without tiles one per image, as before."""

from __future__ import annotations

import torch
from fixtures_model import tiny_model

from vlmforge.model import positions as pos
from vlmforge.text.tokenization import load_tokenizer

TOKENS_PER_TILE = 4  # tiny-siglip 64 px, 8x8 patches pooled 2x2


def _row(img: int, text: int, runs: list[int]) -> list[int]:
    """A row: text, then per image its tiles x 4 placeholders, text between images."""
    out = [text]
    for tiles in runs:
        out += [img] * (tiles * TOKENS_PER_TILE) + [text, text]
    return out


def _increments(model, ids: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Per-token position increments of the training-time V2PE positions."""
    positions = model.position_ids_for(ids, seq).double()
    inc = torch.diff(positions, dim=1, prepend=torch.full_like(positions[:, :1], -1.0))
    return inc


def test_all_tiles_of_one_image_share_their_drawn_step(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    model = tiny_model(tok, "model.projector.pool_size=2", "model.images.tiles=true", "model.images.max_tiles=4",
                       "model.positions=v2pe", "model.v2pe_max_denominator=256")
    model.train()
    img, text = model.image_token_id, 5
    runs = [[5, 1, 3], [4]]  # tiles per image in each of two packed rows
    ids = torch.tensor([_row(img, text, r) + [text] * (52 - len(_row(img, text, r))) for r in runs])
    seq = torch.zeros_like(ids)
    torch.manual_seed(0)
    deltas_seen = set()
    for _ in range(20):  # with 9 possible steps, 20 draws of 4 images would almost surely differ somewhere
        inc = _increments(model, ids, seq)
        for r, tiles in enumerate(runs):
            at = 1
            for n in tiles:
                block = inc[r, at + 1: at + n * TOKENS_PER_TILE]  # the first token's increment follows text
                assert torch.allclose(block, block[0].expand_as(block)), (r, n, block)
                deltas_seen.add(float(block[0]))
                at += n * TOKENS_PER_TILE + 2
    assert len(deltas_seen) > 1  # steps are really drawn, not a constant


def test_without_tiles_each_image_still_draws_its_own_step(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    model = tiny_model(tok, "model.projector.pool_size=2", "model.positions=v2pe")
    model.train()
    img, text = model.image_token_id, 5
    ids = torch.tensor([_row(img, text, [1, 1, 1])])
    seq = torch.zeros_like(ids)
    torch.manual_seed(3)
    got = model.draw_v2pe_deltas(ids, seq)
    torch.manual_seed(3)
    assert torch.equal(got, pos.draw_v2pe_deltas(3, 256))  # the draws the fixed grid made before
