"""`vlmforge plan`: the memory and time figures against hand-worked numbers for the tiny recipe, the
activation formulas against the bytes autograd really keeps, and the Open-Qwen2VL check."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, SiglipVisionConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.plan import estimate
from vlmforge.plan.hardware import GIB, GPUS
from vlmforge.plan.planner import make_plan, parse_count
from vlmforge.plan.shape import model_shape

TINY = ["--set", "train.loss_chunk_tokens=128"]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_recipe("tiny/pretrain", ["train.loss_chunk_tokens=128"])
    return cfg, model_shape(cfg)


def test_tiny_shape_is_the_hand_count(tiny):
    """tiny-qwen2 (vocab 1024, h 64, 4 heads / 2 kv heads of 16, I 256, 2 layers, tied) + tiny-siglip
    (64 px, patch 8, h 64, I 256, 2 blocks, the first one used) + avgpool_mlp 64 -> 64 -> 64."""
    _, s = tiny
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 256 + 2 * 64  # q k v o, gate up down, norms
    block = 4 * (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64) + 4 * 64  # attention, fc1 fc2, 2 LayerNorms
    vision_embed = 3 * 8 * 8 * 64 + 64 + 64 * 64  # patch conv + 64 position embeddings
    projector = 2 * (64 * 64 + 64)
    llm = 1024 * 64 + 2 * layer + 64
    assert layer == s.params_largest_unit == 61696
    assert s.params_total == llm + vision_embed + 2 * block + 2 * 64 + projector == 313856
    assert s.params_trainable == llm + vision_embed + block + projector  # the second block is past the feature layer
    assert s.params_root == 1024 * 64 + 64 + projector + vision_embed + 2 * 64
    assert s.params_root_trainable == s.params_root - 2 * 64  # SigLIP's post-layernorm is never run
    assert s.params_muon == 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 256) + (4 * 64 * 64 + 2 * 64 * 256) + 2 * 64 * 64
    assert (s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab) == (2, 64, 4, 2, 16, 256, 1024)
    assert (s.vision_layers, s.patches, s.tokens_per_image, s.vision_trains, s.projector_trains) == (1, 64, 16, True, True)


def test_tiny_memory_and_time_against_hand_worked_numbers(tiny):
    """2 GPUs, micro-batch 4 x 256 tokens, a quarter of them visual (16 images = 1024 patches), bf16."""
    cfg, s = tiny
    p = make_plan(cfg, gpus=2, gpu="a100-40g", tokens=1e9, mfu=0.5, gpu_hours=0.01, visual_fraction=0.25, shape=s)
    m = p["memory"]
    assert m["states"] == {
        "parameters": 4 * 313856 / 2, "gradients": 4 * 263744 / 2, "optimizer": 8 * 263744 / 2,
        # root (weights + its gradient) + two layers gathered + one layer's gradient and its fp32 copy
        "gathered": 2 * (90496 + 90368) + 2 * 2 * 61696 + (2 + 4) * 61696,
    }
    tokens = 1024
    layer = (2 * (4 + 4) * 64 + 2 * (2 * 64 + 2 * 32) + 4 * 2 * 256 + 4 * 4 + 8) * tokens  # 3480 B per token
    final_norm = (4 + 4) * 64 * tokens
    block = (2 * (8 * 64 + 2 * 256) + 4 * 4 + 4 * 2) * 1024  # per patch 2072 B
    projector = 2 * (64 + 2 * 64) * 256
    assert m["activations"]["no_checkpointing"] == 2 * layer + layer + final_norm + (block + block) + projector
    assert m["activations"]["checkpointing"] == (
        2 * 2 * 64 * tokens + layer + layer + final_norm + (2 * 64 * 1024 + block + block) + projector)
    assert m["logits"] == {"full": 12 * 768 * 1024, "chunked": (4 + 2) * 128 * 1024 + 4 * 1024 * 64}
    states = sum(m["states"].values())
    want = states + m["activations"]["checkpointing"] + m["logits"]["full"]
    assert m["totals"]["checkpointing/full"] == pytest.approx(want * 1.05 + 1.5 * GIB)
    assert m["total"] == m["totals"]["no_checkpointing/chunked"]  # the recipe: no checkpointing, chunks of 128

    per_token = 1133952 + 12 * 2 * 4 * 16 * 256 + 0.25 / 16 * s.image_flops  # 6N (N = layers + norm + head) + attention
    assert s.llm_matmul_flops == 6 * (2 * 61696 + 64 + 1024 * 64) == 1133952
    assert p["flops_per_token"] == pytest.approx(per_token)
    assert p["gpu_hours"] == pytest.approx(1e9 * per_token / (312e12 * 0.5) / 3600)
    assert p["wall_hours"] == pytest.approx(p["gpu_hours"] / 2)
    assert p["implied_mfu"] == pytest.approx(1e9 * per_token / (0.01 * 3600 * 312e12))
    assert p["steps"] == -(-1e9 // (8 * 256))


def _saved_bytes(layer, x, **kwargs) -> int:
    """Bytes of the distinct storages autograd keeps for backward (not the weights, not `skip`)."""
    skip = {t.untyped_storage().data_ptr() for t in kwargs.pop("skip", ())}
    skip |= {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, **kwargs)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_activation_formulas_are_what_autograd_keeps(tiny, dtype, masked):
    """A transformers Qwen2 decoder layer and a SigLIP block of the tiny presets keep exactly the bytes
    per token the planner counts (flash width without a mask; sdpa's repeat_kv copies with one)."""
    _, s = tiny
    seq = 48
    cb = 2 if dtype == torch.bfloat16 else 4
    w = estimate.Workload(gpus=1, micro_batch=1, seq_len=seq, visual_fraction=0.0, supervised_fraction=1.0,
                          compute_bytes=cb, attention_kernel="sdpa" if masked else "flash")
    cfg = Qwen2Config(hidden_size=s.hidden, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      intermediate_size=s.intermediate, num_hidden_layers=1, vocab_size=s.vocab)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Qwen2DecoderLayer(cfg, 0).to(dtype)
    x = torch.randn(1, seq, s.hidden, dtype=dtype, requires_grad=True)
    pos = torch.arange(seq)[None]
    cos, sin = Qwen2RotaryEmbedding(cfg)(x, pos)  # shared by every layer: not a layer's activation
    mask = None
    if masked:
        mask = torch.zeros(1, 1, seq, seq, dtype=dtype).masked_fill(torch.ones(seq, seq).triu(1).bool(), -1e4)
    skip = [cos, sin] + ([mask] if masked else [])
    got = _saved_bytes(layer, x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos, skip=skip)
    assert got == estimate.llm_layer_bytes_per_token(s, w) * seq

    vcfg = SiglipVisionConfig(hidden_size=s.vision_hidden, num_attention_heads=s.vision_heads,
                              intermediate_size=s.vision_intermediate)
    vcfg._attn_implementation = "sdpa"
    block = SiglipEncoderLayer(vcfg).to(dtype)
    xv = torch.randn(1, seq, s.vision_hidden, dtype=dtype, requires_grad=True)
    assert _saved_bytes(block, xv, attention_mask=None) == estimate.vision_layer_bytes_per_patch(s, w) * seq


def test_open_qwen2vl_check_implied_mfu_and_fit():
    """The published run: 5B packed tokens (29M pairs: ~172 tokens a sample, 144 visual) on 8 x
    A100-40G in 220 GPU-hours, micro-batch 1 x 4096 tokens."""
    cfg = load_recipe("open_qwen2vl/pretrain")
    s = model_shape(cfg)
    vf = 144 / 172
    p = make_plan(cfg, gpus=8, gpu="a100-40g", tokens=5e9, gpu_hours=220, visual_fraction=vf, shape=s)
    per_token = s.llm_token_flops(4096) + vf / 144 * s.image_flops
    assert p["flops_per_token"] == pytest.approx(per_token)
    assert p["implied_mfu"] == pytest.approx(5e9 * per_token / (220 * 3600 * GPUS["a100-40g"].peak_bf16_flops))
    assert 0.2 < p["implied_mfu"] < 0.5
    assert p["workload"]["micro_batch"] == 1 and p["workload"]["seq_len"] == 4096
    assert p["memory"]["fits"] and p["memory"]["total"] < 40 * GIB
    assert p["memory"]["totals"]["checkpointing/full"] < p["memory"]["totals"]["no_checkpointing/full"]


def test_plan_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no gpu_check result of this checkout's own in the way
    measured = tmp_path / "gpu_check.json"  # bench/gpu_check.sh's layout
    variants = [{"variant": "eager-full", "compile": False, "loss": "full logits", "mfu": 0.31},
                {"variant": "eager-chunked", "compile": False, "loss": "chunked (1024 tokens)", "mfu": 0.33},
                {"variant": "compiled-chunked", "compile": True, "loss": "chunked (1024 tokens)", "mfu": 0.42}]
    measured.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "tiny": False, "variants": variants}))
    rc = main(["plan", "--recipe", "tiny/pretrain", *TINY, "--gpus", "2", "--gpu", "h100", "--tokens", "2M",
               "--measured", str(measured), "--gpu-hours", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0 and "fits in H100" in out and "imply MFU" in out
    assert "MFU 0.330 (measured" in out and "eager-chunked" in out  # the recipe's settings: eager, chunked loss
    measured.write_text(json.dumps({"device": "CPU (x86_64)", "tiny": True, "variants": variants}))
    assert main(["plan", "--recipe", "tiny/pretrain", "--gpus", "2", "--gpu", "h100", "--tokens", "2M",
                 "--measured", str(measured)]) == 2
    assert "says nothing about a GPU" in capsys.readouterr().err
    assert main(["plan", "--recipe", "tiny/pretrain", "--gpus", "1", "--gpu", "b200", "--tokens", "1e6",
                 "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["mfu"] == estimate.DEFAULT_MFU and p["workload"]["sharded"] and p["memory"]["states"]["parameters"] == 4 * 313856
    assert main(["plan", "--recipe", "tiny/pretrain", "--gpus", "2", "--gpu", "h100", "--tokens", "lots"]) == 2
    assert "--tokens 'lots'" in capsys.readouterr().err
    assert parse_count("5B") == 5e9 and parse_count("1.5e3") == 1500 and parse_count("12k") == 12000
