"""Shared model-test helpers: tiny VLMs from the shipped presets and packed batches."""

from __future__ import annotations

import torch

from vlmforge.config import load_recipe


def tiny_cfg(*overrides: str):
    return load_recipe(None, list(overrides)).model


def tiny_model(tokenizer, *overrides: str, seed: int = 0, spread: float | None = None):
    """A randomly initialised tiny VLM in eval mode. `spread` re-draws LLM weights with a larger std
    so that greedy decoding is not one repeated token."""
    from vlmforge.model.build import build_vlm

    model = build_vlm(tiny_cfg(*overrides), tokenizer, seed=seed).eval()
    if spread:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.llm.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=g) * spread)
    return model


def tiny_checkpoint(folder):
    """A tiny random VLM (4 visual tokens: short prompts) with a fresh tiny tokenizer, saved under
    ``folder/ckpt``. Returns (checkpoint folder, model in eval mode, tokenizer)."""
    from fixtures_tokenizer import shape_sentences

    from vlmforge.model.build import build_vlm
    from vlmforge.model.saving import save_vlm
    from vlmforge.text.tokenization import load_tokenizer, train_tokenizer

    train_tokenizer(shape_sentences(), folder / "tok", vocab_size=512, min_frequency=2)
    tok = load_tokenizer(folder / "tok")
    cfg = load_recipe(None, ["model.projector.pool_size=2"])
    model = build_vlm(cfg.model, tok, seed=0).eval()
    save_vlm(model, tok, cfg, folder / "ckpt")
    return folder / "ckpt", model, tok


def packed_batch(model, samples_per_row=((20, 1), (15, 0), (30, 2)), rows: int = 2, pad: int = 7, seed: int = 0):
    """Rows of packed samples; each sample = (text tokens, images). Returns the batch dict and, per
    row, the list of (start, end, image indices) for per-sample reference runs."""
    g = torch.Generator().manual_seed(seed)
    t = model.tokens_per_image
    vocab = model.llm.get_input_embeddings().num_embeddings
    row_ids, row_seq, layout, n_img = [], [], [], 0
    for r in range(rows):
        ids, seq, spans = [], [], []
        for s, (n_text, n_images) in enumerate(samples_per_row[r:] + samples_per_row[:r]):
            start = len(ids)
            imgs = []
            for _ in range(n_images):
                ids += [model.image_token_id] * t
                imgs.append(n_img)
                n_img += 1
            text = torch.randint(10, vocab, (n_text,), generator=g)
            text[text == model.image_token_id] = 11
            ids += text.tolist()
            seq += [s] * (len(ids) - start)
            spans.append((start, len(ids), imgs))
        row_ids.append(ids)
        row_seq.append(seq)
        layout.append(spans)
    width = max(len(i) for i in row_ids) + pad
    input_ids = torch.full((rows, width), 0, dtype=torch.long)
    seq_ids = torch.full((rows, width), -1, dtype=torch.long)
    for r in range(rows):
        input_ids[r, : len(row_ids[r])] = torch.tensor(row_ids[r])
        seq_ids[r, : len(row_seq[r])] = torch.tensor(row_seq[r])
    from vlmforge.model.positions import restart_positions

    size = model.image_size
    pixel_values = torch.randn(n_img, 3, size, size, generator=g)
    batch = dict(input_ids=input_ids, seq_ids=seq_ids, position_ids=restart_positions(seq_ids), pixel_values=pixel_values)
    return batch, layout
