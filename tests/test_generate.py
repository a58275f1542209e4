"""Generation: KV cache vs none, batching with left padding, sampling, the generate command."""

from __future__ import annotations

import pytest
import torch
from fixtures_model import tiny_model
from PIL import Image

from vlmforge.model.decoding import generate
from vlmforge.text.tokenization import load_tokenizer

PROMPTS = [
    [{"role": "user", "content": "<image>What is in the picture?"}],
    [{"role": "user", "content": "Describe the image. <image>"}],
    [{"role": "user", "content": "Is there a red circle?"}],
]
IMAGES = [[Image.new("RGB", (64, 64), (255, 0, 0))], [Image.new("RGB", (50, 80), (0, 0, 255))], []]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.mark.parametrize("positions", ["restart", "v2pe"])
def test_cache_and_no_cache_give_identical_greedy_tokens(tok, positions):
    model = tiny_model(tok, "model.projector.pool_size=2", f"model.positions={positions}", "model.v2pe_delta=0.5", spread=0.3)
    cached = generate(model, tok, PROMPTS, IMAGES, max_new_tokens=12, return_ids=True)
    plain = generate(model, tok, PROMPTS, IMAGES, max_new_tokens=12, use_cache=False, return_ids=True)
    assert cached == plain
    assert len(set(cached[0])) > 2  # a non-degenerate sequence was compared
    # batching (left padding) does not change a prompt's answer
    alone = generate(model, tok, PROMPTS[1:2], IMAGES[1:2], max_new_tokens=12, return_ids=True)
    assert alone[0] == cached[1]


def test_sampling_is_seeded_and_stops(tok):
    model = tiny_model(tok, "model.projector.pool_size=2", spread=0.3)
    a = generate(model, tok, PROMPTS, IMAGES, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tok, PROMPTS, IMAGES, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a == b and all(isinstance(s, str) for s in a)
    # a model whose head always prefers <|im_end|> stops at once with an empty answer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    head = torch.nn.Linear(model.llm.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[im_end] = 1.0
    model.llm.lm_head = head
    assert generate(model, tok, PROMPTS, IMAGES, max_new_tokens=8, return_ids=True) == [[], [], []]


def test_marker_count_mismatch_names_prompt(tok):
    model = tiny_model(tok, "model.projector.pool_size=2")
    with pytest.raises(ValueError, match="prompt 2: 0 <image> marker"):
        generate(model, tok, PROMPTS, IMAGES[:2] + [[IMAGES[0][0]]], max_new_tokens=2)


def test_continuation_logprobs_match_one_row_at_a_time(tok):
    """Batched, right-padded scoring of several candidates equals scoring each alone by hand."""
    from vlmforge.arch.tokens import IM_END
    from vlmforge.images import preprocess_batch
    from vlmforge.model.decoding import prompt_ids
    from vlmforge.model.likelihood import continuation_logprobs

    model = tiny_model(tok, "model.projector.pool_size=2", spread=0.3)
    cands = [["red", "a blue square", "no"], ["yes", "green"], ["circle"]]
    got = continuation_logprobs(model, tok, PROMPTS, IMAGES, cands, any_first_case=False)
    end = tok.convert_tokens_to_ids(IM_END)
    for i, (messages, ims) in enumerate(zip(PROMPTS, IMAGES)):
        head = prompt_ids(model, tok, messages, len(ims), i)
        pv = preprocess_batch(ims, model.preprocess_spec()) if ims else None
        for c, score in zip(cands[i], got[i]):
            tail = tok(c, add_special_tokens=False)["input_ids"] + [end]
            ids = torch.tensor([head + tail])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids, pv), -1)[0]
            want = sum(float(logp[len(head) + j - 1, t]) for j, t in enumerate(tail))
            assert score == pytest.approx(want, abs=1e-4)
    assert len({round(s, 3) for s in got[0]}) == 3  # a non-degenerate comparison
    # any first-letter case: the probability of "red" or "Red"
    both = continuation_logprobs(model, tok, PROMPTS[:1], IMAGES[:1], [["red"]])[0][0]
    lower, upper = continuation_logprobs(model, tok, PROMPTS[:1], IMAGES[:1], [["red", "Red"]], any_first_case=False)[0]
    assert both == pytest.approx(float(torch.logsumexp(torch.tensor([lower, upper]), 0)), abs=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_repeated_prompts_share_one_prefill_and_sample_as_if_alone(tok, use_cache):
    """Samples of one prompt (same ids, same image objects) are prefilled once; each row still
    draws from its own seed, exactly as when every copy is its own prompt (copied images: no sharing)."""
    from vlmforge.model import decoding

    model = tiny_model(tok, "model.projector.pool_size=2", spread=0.3)
    prompts = [PROMPTS[k] for k in (0, 1, 0, 2, 0, 1)]
    images = [IMAGES[k] for k in (0, 1, 0, 2, 0, 1)]
    copies = [[im.copy() for im in ims] for ims in images]
    seeds = [11, 12, 13, 14, 15, 16]
    prefilled = []
    real_embed = model.embed

    def counting_embed(ids, *args, **kwargs):
        prefilled.append(ids.shape[0])
        return real_embed(ids, *args, **kwargs)

    model.embed = counting_embed
    shared = decoding.generate(model, tok, prompts, images, max_new_tokens=10, temperature=1.0, seed=seeds,
                               use_cache=use_cache, return_ids=True)
    alone = decoding.generate(model, tok, prompts, copies, max_new_tokens=10, temperature=1.0, seed=seeds,
                              use_cache=use_cache, return_ids=True)
    assert prefilled == [3, 6]  # three distinct prompts, then six (copies are never shared)
    assert shared == alone
    assert shared[0] != shared[2]  # one prompt, two seeds: two samples
