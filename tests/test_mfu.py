"""Model FLOPs per step (vlmforge.model.flops) equal a hand count for the tiny VLM; MFU per step
(vlmforge.train.mfu) divides them by time and a peak from the GPU table or a CPU matmul probe;
`vlmforge model-info` prints the same per-token figures."""

from __future__ import annotations

import pytest
import torch
from fixtures_train import build_tiny_vlm, tiny_recipe

from vlmforge.model.flops import batch_flops, flops_counts, span_squares, training_flops
from vlmforge.train.mfu import StepFlops, device_peak, table_peak

# The tiny presets (assets/configs/tiny-qwen2.json, tiny-siglip.json), with tiny_recipe's pool 2.
V, D, MLP, LAYERS, HEADS, KV_HEADS = 1024, 64, 256, 2, 4, 2  # Qwen2: vocab, hidden, mlp, layers, heads
HEAD_DIM = D // HEADS
DV, IV, PATCH, IMAGE = 64, 256, 8, 64  # SigLIP: hidden, mlp, patch, image size (2 blocks, feature layer -2)


def hand_llm_params() -> int:
    q = D * D + D  # Qwen2's q, k, v projections have biases, o has none
    k = v = D * (KV_HEADS * HEAD_DIM) + KV_HEADS * HEAD_DIM
    o = D * D
    mlp = 3 * D * MLP  # gate, up, down (no biases)
    norms = 2 * D  # input and post-attention RMSNorm
    per_layer = q + k + v + o + mlp + norms
    return LAYERS * per_layer + D + V * D  # + final norm + head (tied to the embedding, still a matmul)


def hand_vision_params() -> int:
    attn = 4 * (DV * DV + DV)  # q, k, v, out with biases
    mlp = (DV * IV + IV) + (IV * DV + DV)
    norms = 2 * 2 * DV  # two LayerNorms with weight and bias
    patch_embed = 3 * PATCH * PATCH * DV + DV  # the patchify conv (position embeddings are a lookup: not counted)
    used_blocks = 1  # feature layer -2 of 2 blocks = the output of block 1
    return used_blocks * (attn + mlp + norms) + patch_embed


def hand_projector_params() -> int:
    return (DV * D + D) + (D * D + D)  # linear_1, linear_2 (hidden = LLM width)


PATCHES = (IMAGE // PATCH) ** 2
VISUAL_TOKENS = 2 * 2


def _batch():
    # row 0: documents of 5 and 3 tokens, then 2 padding; row 1: one document of 10 tokens
    seq = torch.tensor([[0] * 5 + [1] * 3 + [-1] * 2, [0] * 10])
    return {"input_ids": torch.zeros_like(seq), "seq_ids": seq, "pixel_values": torch.zeros(3, 3, IMAGE, IMAGE)}


def test_counts_equal_the_hand_count():
    model = build_tiny_vlm(tiny_recipe())
    c = flops_counts(model)
    assert c.llm_params == hand_llm_params() == 188_992
    assert c.vision_params == hand_vision_params() == 62_336
    assert c.projector_params == hand_projector_params() == 8_320
    assert (c.patches, c.tokens_per_image) == (PATCHES, VISUAL_TOKENS)
    assert c.llm_attention == LAYERS * HEADS * HEAD_DIM
    assert c.vision_attention == 1 * DV


def test_step_flops_equal_the_hand_count_causal_and_document():
    model = build_tiny_vlm(tiny_recipe(["model.vision.frozen=false"]))  # everything trains: f = 6, a = 12
    batch = _batch()
    tokens = 18  # real tokens (seq_id >= 0)
    per_image = (6 * hand_vision_params() * PATCHES + 12 * 1 * DV * PATCHES**2
                 + 6 * hand_projector_params() * VISUAL_TOKENS)
    for mode, squares in (("causal", 8**2 + 10**2), ("document", 5**2 + 3**2 + 10**2)):
        model.attention = mode
        got = batch_flops(flops_counts(model), batch)
        assert got["llm"] == 6 * hand_llm_params() * tokens
        assert got["attention"] == 12 * LAYERS * HEADS * HEAD_DIM * squares
        assert got["vision"] == 3 * per_image
        assert got["total"] == got["llm"] + got["attention"] + got["vision"]


def test_freeze_policy_sets_the_factors():
    frozen_vision = flops_counts(build_tiny_vlm(tiny_recipe(["model.vision.frozen=true"])))
    assert (frozen_vision.vision_factor, frozen_vision.vision_attention_factor) == (2, 4)
    assert (frozen_vision.projector_factor, frozen_vision.llm_factor, frozen_vision.attention_factor) == (6, 6, 12)
    # only the projector trains: the LLM passes gradients back to it (4N) but trains no weight
    llm_frozen = flops_counts(build_tiny_vlm(tiny_recipe(["model.vision.frozen=true", "model.llm.frozen=true"])))
    assert (llm_frozen.llm_factor, llm_frozen.attention_factor, llm_frozen.projector_factor) == (4, 12, 6)


def test_preference_branches_count_the_prompt_once():
    # one pair: prompt 3, chosen 2, rejected 4 tokens, then padding
    seq = torch.tensor([[0] * 9 + [-1]])
    branch = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1]])
    assert span_squares(seq, "document", branch) == (3 + 2) ** 2 + (3 + 4) ** 2 - 3**2
    assert span_squares(seq, "document") == 9**2


def test_step_metrics_and_peak(monkeypatch):
    model = build_tiny_vlm(tiny_recipe())
    flops = StepFlops(model, tiny_recipe().train, torch.device("cpu"))
    assert flops.peak_tflops > 0 and "matmul probe" in flops.peak_source
    assert device_peak(torch.device("cpu"), torch.float32)[0] == flops.peak_tflops  # probed once, cached
    total = flops.flops([_batch(), _batch()])["total"]
    row = flops.step_metrics([_batch(), _batch()], step_time=0.5)
    assert row["model_tflops"] == pytest.approx(total / 1e12)
    assert row["tflops_per_s"] == pytest.approx(total / 0.5 / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops_per_s"] / flops.peak_tflops)


def test_gpu_peak_table():
    assert table_peak("NVIDIA A100-SXM4-40GB") == 312
    assert table_peak("NVIDIA H100 80GB HBM3") == 989
    assert table_peak("NVIDIA H100 PCIe") == 756
    assert table_peak("NVIDIA H200") == 989
    assert table_peak("NVIDIA B200") == 2250
    assert table_peak("NVIDIA GeForce RTX 4090") is None


def test_model_info_prints_the_same_per_token_figures(capsys):
    from vlmforge.cli import main
    from vlmforge.model.info_command import model_info

    cfg = tiny_recipe()
    info = model_info(cfg)
    model = build_tiny_vlm(cfg)
    expected = training_flops(model, int(cfg.pack.max_len))
    for key in ("llm_params", "llm_per_token", "per_image", "per_visual_token"):
        assert info["flops"][key] == expected[key]
    assert info["flops"]["llm_per_token"] == 6 * hand_llm_params() + 12 * LAYERS * HEADS * HEAD_DIM * cfg.pack.max_len
    assert main(["model-info", "--set", "model.projector.pool_size=2"]) == 0
    assert "matmuls 1.134M (N = 188.992K non-embedding params + head)" in capsys.readouterr().out
