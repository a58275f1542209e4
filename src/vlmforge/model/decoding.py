"""Batched generation for a VisionLanguageModel: chat prompts with images, KV cache, greedy or
temperature/top-p sampling, stop at `<|im_end|>` (or EOS).

Prompts are left-padded; we pass explicit additive masks (padding keys masked) and explicit
positions (restart per prompt, or V2PE with the configured delta) at prefill and at every step,
so cached and uncached decoding compute the same thing. Sampling draws each prompt's tokens from
its own generator (seeded per prompt), so a prompt's answer does not depend on the batch it is in.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch
from PIL import Image
from transformers import DynamicCache

from vlmforge.arch.tokens import IM_END
from vlmforge.images import preprocess_batch, tile_images
from vlmforge.model import attention as attn
from vlmforge.model.positions import restart_positions, v2pe_positions
from vlmforge.text.chat import encode_conversation


def image_sizes(images: Sequence | int) -> list[tuple[int, int]] | int:
    """(width, height) of each of a prompt's images, given as PIL images or as sizes; an int (a count) as is."""
    if isinstance(images, int):
        return images
    return [tuple(int(v) for v in (im.size if isinstance(im, Image.Image) else im)) for im in images]


def prompt_ids(model, tokenizer, messages: Sequence[dict], images: Sequence | int, index: int = 0) -> list[int]:
    """Chat template with the generation prompt; the k-th `<image>` expanded by the model's layout
    (``model.image_layout``: its tiles x visual tokens per tile, wrapped in ``model.images.start`` /
    ``end``). ``images``: the prompt's PIL images or their (width, height) sizes, in marker order; a
    count is enough when the model does not tile (every image is then one tile)."""
    ids, _ = encode_conversation(tokenizer, messages, add_generation_prompt=True)
    layout = model.image_layout(tokenizer)
    sizes = image_sizes(images)
    if isinstance(sizes, int):
        if sizes and layout.tiling is not None:
            raise ValueError(f"prompt {index}: the model tiles images (model.images.tiles), so its placeholders "
                             f"need the images or their (width, height) sizes, not a count ({sizes})")
        sizes = [(1, 1)] * sizes  # untiled: one tile per image whatever its size
    marks = sum(1 for i in ids if i == model.image_token_id)
    if marks != len(sizes):
        raise ValueError(f"prompt {index}: {marks} <image> marker(s) in the messages but {len(sizes)} image(s) given")
    return layout.expand(ids, model.image_token_id, sizes).tolist()


def prompt_pixels(model, tokenizer, images: list[list]) -> torch.Tensor | None:
    """pixel_values for a batch of prompts: each prompt's tower inputs (its images, or their tiles
    under the model's layout) in order, prompt after prompt; None without images."""
    layout = model.image_layout(tokenizer)
    flat = [t for ims in images for t in tile_images(list(ims), layout)]
    return preprocess_batch(flat, model.preprocess_spec()) if flat else None


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids generation stops at: `<|im_end|>` (end of turn) first, then the tokenizer's EOS if it differs."""
    out: list[int] = []
    for s in (tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id):
        if s is not None and s != tokenizer.unk_token_id and int(s) not in out:
            out.append(int(s))
    return out


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of token ids as one left-padded batch: ids [B, T] and the mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        valid[i, width - len(r):] = True
    return ids, valid


def distinct_rows(rows: list[list[int]], images: list[list]) -> tuple[list[int], torch.Tensor | None]:
    """The first index of each distinct prompt (same ids and the same image objects), and each row's
    distinct prompt (None when every prompt is distinct). Samples of one prompt (Best-of-N,
    preference replies, Monte Carlo rollouts) then share one prefill."""
    slot: dict[tuple, int] = {}
    firsts, expand = [], []
    for i, (r, ims) in enumerate(zip(rows, images)):
        key = (tuple(r), tuple(id(im) for im in ims))
        if key not in slot:
            slot[key] = len(firsts)
            firsts.append(i)
        expand.append(slot[key])
    if len(firsts) == len(rows):
        return firsts, None
    return firsts, torch.tensor(expand, dtype=torch.long)


@functools.lru_cache(maxsize=None)
def _cache_argument(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters  # deprecate_kwarg keeps the signature
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(lm, cache) -> dict:
    """The KV-cache keyword of ``lm``'s forward: ``cache`` since transformers 5.24 (which deprecates
    ``past_key_values``, to be removed in 5.40), ``past_key_values`` in older versions."""
    return {_cache_argument(type(lm)): cache}


def row_generators(seed: int | Sequence[int] | None, rows: int, device) -> list[torch.Generator] | None:
    """One generator per prompt: ``seed`` an int (every prompt seeded alike) or one seed per prompt."""
    if seed is None:
        return None
    seeds = [int(seed)] * rows if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} prompts")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator] | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # smallest prefix whose mass reaches top_p (top-1 always kept)
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    probs = probs / probs.sum(-1, keepdim=True)
    if gens is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[r : r + 1], 1, generator=g) for r, g in enumerate(gens)]).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    key_valid: torch.Tensor,
    pixel_values: torch.Tensor | None,
    stop_ids: set[int],
    pad_id: int,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    seed: int | Sequence[int] | None = None,
    v2pe_delta: float | None = None,
    expand: torch.Tensor | None = None,
) -> list[list[int]]:
    """Left-padded prompts [B, P] (key_valid False on padding) -> new token ids per row (stop token excluded).

    Sampling (temperature > 0): ``seed`` seeds each row's own generator (an int: every row alike;
    a sequence: one seed per row; None: torch's global generator).
    ``expand`` (optional, [R] indices into the B prompts): decode R rows, row r continuing prompt
    ``expand[r]``; each distinct prompt is prefilled once and its cache shared by its rows."""
    model.use_sdpa()  # cached decoding uses explicit 4D masks
    b = input_ids.shape[0] if expand is None else int(expand.numel())
    dev = input_ids.device
    gens = row_generators(seed, b, dev) if temperature > 0 else None
    seq_ids = torch.where(key_valid, 0, -1)
    embeds = model.embed(input_ids, pixel_values, seq_ids)
    delta = model.v2pe_delta if v2pe_delta is None else v2pe_delta

    def positions(ids, sids):
        if model.positions == "v2pe":  # a fixed delta: each tile's tokens advance alike, no per-image grouping
            return v2pe_positions(ids, sids, model.image_token_id, model.tokens_per_image, float(delta))
        return restart_positions(sids)

    lm, head = model.llm.base_model, model.llm.get_output_embeddings()
    pos = positions(input_ids, seq_ids)
    cache = DynamicCache(config=model.llm.config) if use_cache else None
    mask = attn.additive_mask(seq_ids, "causal", embeds.dtype)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=use_cache, **cache_kwargs(lm, cache))
    logits = head(out.last_hidden_state[:, -1])
    if expand is not None:  # the prefill ran once per distinct prompt: give every row its prompt's state
        expand = expand.to(dev)
        if cache is not None:
            cache.reorder_cache(expand)
        logits, pos, input_ids, key_valid, embeds = (t[expand] for t in (logits, pos, input_ids, key_valid, embeds))
    new = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    ids_all, embeds_all, valid_all = input_ids, embeds, key_valid
    for _ in range(max_new_tokens):
        logits[:, model.image_token_id] = torch.finfo(logits.dtype).min  # never emit a placeholder
        tok = _pick(logits, temperature, top_p, gens)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        for r, t in enumerate(tok.tolist()):
            if not done[r]:
                if t in stop_ids:
                    done[r] = True
                else:
                    new[r].append(t)
        if bool(done.all()):
            break
        emb = model.llm.get_input_embeddings()(tok[:, None])
        ids_all = torch.cat([ids_all, tok[:, None]], 1)
        valid_all = torch.cat([valid_all, torch.ones(b, 1, dtype=torch.bool, device=dev)], 1)
        if use_cache:
            pos = pos[:, -1:] + 1  # the previous token is text: +1 in every position mode
            mask = attn.key_padding_mask(valid_all, 1, emb.dtype)
            out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(lm, cache))
        else:
            embeds_all = torch.cat([embeds_all, emb], 1)
            sids = torch.where(valid_all, 0, -1)
            mask = attn.additive_mask(sids, "causal", emb.dtype)
            out = lm(inputs_embeds=embeds_all, attention_mask=mask, position_ids=positions(ids_all, sids), use_cache=False)
        logits = head(out.last_hidden_state[:, -1])
    return new


def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    images: list[list],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    seed: int | Sequence[int] | None = 0,
    return_ids: bool = False,
    reply_prefixes: Sequence[str] | None = None,
):
    """Answers (str) for a batch of chat prompts; `images[i]` are PIL images for `<image>` markers of prompt i
    (a tiling model cuts each into its tiles: ``model.image_layout``).

    Sampling seeds are per prompt (``seed``: one int for all, or one per prompt), so a prompt's
    sampled answer is the same in any batch. ``reply_prefixes[i]`` (optional): the start of the
    assistant's reply to prompt i, which the model continues; the returned text is the
    continuation only (Monte Carlo rollouts from a partial solution)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    if reply_prefixes is not None and len(reply_prefixes) != len(prompts):
        raise ValueError(f"{len(reply_prefixes)} reply prefixes for {len(prompts)} prompts")
    if not prompts:
        return []
    dev = next(model.parameters()).device
    rows = [prompt_ids(model, tokenizer, m, ims, i) for i, (m, ims) in enumerate(zip(prompts, images))]
    if reply_prefixes is not None:
        rows = [r + (tokenizer.encode(p, add_special_tokens=False) if p else []) for r, p in zip(rows, reply_prefixes)]
    pad = int(tokenizer.pad_token_id)
    firsts, expand = distinct_rows(rows, images)
    ids, valid = left_padded([rows[i] for i in firsts], pad)
    pv = prompt_pixels(model, tokenizer, [images[i] for i in firsts])
    if pv is not None:
        pv = pv.to(dev)
    was_training = model.training
    model.eval()
    try:
        new = generate_ids(
            model, ids.to(dev), valid.to(dev), pv, set(end_of_turn_ids(tokenizer)), pad,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, use_cache=use_cache, seed=seed,
            expand=expand,
        )
    finally:
        model.train(was_training)
    if return_ids:
        return new
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new]
