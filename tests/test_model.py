"""VisionLanguageModel: projectors, placeholders, attention modes, positions (V2PE), freezing, checkpoints."""

from __future__ import annotations

import pytest
import torch
from fixtures_model import packed_batch, tiny_cfg, tiny_model

from vlmforge.arch.geometry import image_preprocess_spec, visual_tokens_per_image
from vlmforge.arch.projectors.avgpool_mlp import AvgPoolMLPProjector
from vlmforge.arch.projectors.pixel_shuffle_mlp import PixelShuffleMLPProjector, pixel_shuffle
from vlmforge.errors import ConfigError
from vlmforge.model.vlm import ImageTokenMismatch
from vlmforge.text.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def per_sample_logits(model, batch, layout, **kw):
    """Reference: every packed sample run alone (its own row, its own images)."""
    out = []
    for r, spans in enumerate(layout):
        for start, end, imgs in spans:
            ids = batch["input_ids"][r : r + 1, start:end]
            pv = batch["pixel_values"][imgs] if imgs else None
            out.append(((r, start, end), model(ids, pv, **kw)[0]))
    return out


# ---- geometry and projectors ----


def test_geometry_of_presets():
    assert visual_tokens_per_image(tiny_cfg()) == 64
    assert visual_tokens_per_image(tiny_cfg("model.projector.pool_size=4")) == 16
    assert visual_tokens_per_image(tiny_cfg("model.projector.kind=pixel_shuffle_mlp")) == 16
    so400m = ["model.vision.preset=siglip-so400m-patch14-384"]
    assert visual_tokens_per_image(tiny_cfg(*so400m, "model.projector.pool_size=12")) == 144
    assert visual_tokens_per_image(tiny_cfg(*so400m)) == 729
    with pytest.raises(ConfigError, match="even patch grid.*27x27"):
        visual_tokens_per_image(tiny_cfg(*so400m, "model.projector.kind=pixel_shuffle_mlp"))
    assert visual_tokens_per_image(tiny_cfg(*so400m, "model.projector.kind=pixel_shuffle_mlp", "model.vision.image_size=448")) == 256
    spec = image_preprocess_spec(tiny_cfg(*so400m))
    assert spec["size"] == 384 and spec["mean"] == [0.5] * 3 and spec["std"] == [0.5] * 3


def test_avgpool_projector_pools_grid_to_k_by_k():
    proj = AvgPoolMLPProjector(8, 16, pool_size=12)
    x = torch.randn(2, 729, 8)
    assert proj(x).shape == (2, 144, 16)
    # Same as AdaptiveAvgPool2d on the [D, 27, 27] grid followed by the MLP.
    grid = x.transpose(1, 2).reshape(2, 8, 27, 27)
    ref = torch.nn.AdaptiveAvgPool2d(12)(grid).flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj(x), proj.mlp(ref))
    proj.pool_size = None  # a run setting: the same weights on the full grid
    assert proj(x).shape == (2, 729, 16)


def test_pixel_shuffle_hand_worked_order():
    # 4x4 grid, one channel holding the patch index: token (a, b) = patches (2a,2b),(2a,2b+1),(2a+1,2b),(2a+1,2b+1)
    x = torch.arange(16.0).reshape(1, 16, 1)
    y = pixel_shuffle(x, 4)
    assert y.shape == (1, 4, 4)
    assert y[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    with pytest.raises(ValueError, match="even patch grid"):
        PixelShuffleMLPProjector(1, 4)(torch.zeros(1, 9, 1))


def test_pixel_shuffle_matches_internvl_code():
    # InternVL's pixel_shuffle (scale 0.5, ps_version v2), re-typed from its modeling_internvl_chat.py.
    def internvl(x, scale_factor=0.5):
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        return x.permute(0, 2, 1, 3).contiguous()

    x = torch.randn(2, 64, 5)
    ref = internvl(x.reshape(2, 8, 8, 5)).reshape(2, 16, 20)
    torch.testing.assert_close(pixel_shuffle(x, 8), ref, rtol=0, atol=0)


# ---- placeholders ----


def test_placeholder_image_mismatch_names_the_sample(tok):
    model = tiny_model(tok, "model.projector.pool_size=2")
    batch, _ = packed_batch(model)
    with pytest.raises(ImageTokenMismatch, match=r"holds 2"):
        model(batch["input_ids"], batch["pixel_values"][:2], seq_ids=batch["seq_ids"])
    ids = batch["input_ids"].clone()
    ids[1, 15] = 12  # row 1, sample 1 (2 images = 8 tokens after 15 text tokens): now one token short
    with pytest.raises(ImageTokenMismatch, match=r"row 1, packed sample 1: a run of 7"):
        model(ids, batch["pixel_values"], seq_ids=batch["seq_ids"])


def test_projected_features_land_on_placeholders(tok):
    model = tiny_model(tok, "model.projector.pool_size=2")
    batch, _ = packed_batch(model)
    emb = model.embed(batch["input_ids"], batch["pixel_values"], batch["seq_ids"])
    feats = model.encode_images(batch["pixel_values"])
    where = batch["input_ids"] == model.image_token_id
    torch.testing.assert_close(emb[where], feats.reshape(-1, feats.shape[-1]))
    text = model.llm.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(emb[~where], text[~where])


# ---- attention modes and positions ----


@pytest.mark.parametrize("kind", ["avgpool_mlp", "pixel_shuffle_mlp"])
def test_document_mode_equals_per_sample_runs(tok, kind):
    pool = "2" if kind == "avgpool_mlp" else "null"
    model = tiny_model(tok, "model.attention=document", f"model.projector.kind={kind}", f"model.projector.pool_size={pool}")
    batch, layout = packed_batch(model)
    logits = model(**batch)
    for (r, s, e), ref in per_sample_logits(model, batch, layout):
        assert (logits[r, s:e] - ref).abs().max().item() <= 1e-5


def test_causal_mode_attends_across_samples(tok):
    model = tiny_model(tok, "model.projector.pool_size=2")  # attention=causal is the default
    batch, layout = packed_batch(model)
    logits = model(**batch)
    refs = per_sample_logits(model, batch, layout)
    (r, s, e), ref = refs[0]
    assert s == 0 and (logits[r, s:e] - ref).abs().max() <= 1e-5  # the first sample sees nothing before it
    (r, s, e), ref = refs[1]
    assert (logits[r, s:e] - ref).abs().max() > 1e-3  # later ones see earlier samples


def test_v2pe_delta_one_is_exactly_standard(tok):
    std = tiny_model(tok, "model.attention=document", "model.projector.pool_size=2")
    v2pe = tiny_model(tok, "model.attention=document", "model.projector.pool_size=2", "model.positions=v2pe")
    batch, _ = packed_batch(std)
    a = std(**batch)
    b = v2pe(**batch, v2pe_delta=1.0)
    assert torch.equal(a, b)
    c = v2pe(**batch, v2pe_delta=0.25)
    assert (a - c).abs().max() > 1e-3  # fractions reach the rotary embedding
    # text positions are unchanged before the first image, then advance by delta per visual token
    p = v2pe.position_ids_for(batch["input_ids"], batch["seq_ids"], v2pe_delta=0.25)
    t = v2pe.tokens_per_image
    assert p[0, :t].tolist() == [0.25 * i for i in range(t)] and p[0, t].item() == 0.25 * t


def test_v2pe_document_mode_equals_per_sample_runs(tok):
    model = tiny_model(tok, "model.attention=document", "model.projector.pool_size=2", "model.positions=v2pe")
    batch, layout = packed_batch(model)
    logits = model(**batch, v2pe_delta=0.125)
    for (r, s, e), ref in per_sample_logits(model, batch, layout, v2pe_delta=0.125):
        assert (logits[r, s:e] - ref).abs().max().item() <= 1e-5
    # per-image deltas (what training draws): still a per-sample computation
    deltas = torch.tensor([1.0, 0.5, 0.25, 1 / 256])
    logits = model(**batch, v2pe_delta=deltas)
    (r, s, e), _ = per_sample_logits(model, batch, layout)[0]
    alone = model(batch["input_ids"][:1, s:e], batch["pixel_values"][:1], v2pe_delta=deltas[:1])[0]
    assert (logits[0, s:e] - alone).abs().max() <= 1e-5


def test_v2pe_training_draws_deltas_from_powers_of_two():
    from vlmforge.model.positions import draw_v2pe_deltas

    d = draw_v2pe_deltas(2000, 256, torch.Generator().manual_seed(0))
    assert set(d.tolist()) == {2.0**-k for k in range(9)}


def test_padding_gives_finite_logits(tok):
    model = tiny_model(tok, "model.attention=document", "model.projector.pool_size=2")
    batch, _ = packed_batch(model, pad=9)
    assert torch.isfinite(model(**batch)).all()


# ---- freezing, pool size, training step ----


def test_freeze_policy(tok):
    model = tiny_model(tok)
    groups = model.trainable_parameter_groups()
    assert groups["vision"] == [] and groups["projector"] and groups["llm"]
    model = tiny_model(tok, "model.vision.frozen=false", "model.llm.frozen=true")
    groups = model.trainable_parameter_groups()
    assert groups["llm"] == [] and groups["vision"]
    # blocks after the feature layer (-2 -> the last of 2 blocks) are never run: kept frozen
    assert not any(p.requires_grad for p in model.vision_layers()[1].parameters())
    assert all(p.requires_grad for p in model.vision_layers()[0].parameters())


def test_pool_size_is_a_run_setting(tok):
    model = tiny_model(tok, "model.projector.pool_size=4")
    assert model.tokens_per_image == 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_pool_size(None)
    assert model.tokens_per_image == 64
    assert before.keys() == model.state_dict().keys()
    batch, _ = packed_batch(model)
    assert model(**batch).shape[:2] == batch["input_ids"].shape


def test_tiny_forward_backward_2x512(tok):
    model = tiny_model(tok, "model.projector.pool_size=4", "model.vision.frozen=false").train()
    ids = torch.randint(10, len(tok), (2, 512))
    ids[ids == model.image_token_id] = 11
    ids[0, 5:21] = model.image_token_id
    ids[1, 300:316] = model.image_token_id
    seq = torch.zeros(2, 512, dtype=torch.long)
    seq[:, 256:] = 1
    logits = model(ids, torch.randn(2, 3, 64, 64), seq_ids=seq)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameter_groups()["projector"])
    assert all(p.grad is not None for p in model.vision_layers()[0].parameters())


def test_clip_tower(tok):
    model = tiny_model(tok, "model.vision.preset=tiny-clip", "model.projector.kind=mlp", "model.attention=document")
    assert model.tokens_per_image == 64  # CLS dropped
    batch, layout = packed_batch(model)
    logits = model(**batch)
    for (r, s, e), ref in per_sample_logits(model, batch, layout):
        assert (logits[r, s:e] - ref).abs().max().item() <= 1e-5


# ---- checkpoint folder ----


def test_save_load_roundtrip(tok, tmp_path):
    from vlmforge.config import load_recipe
    from vlmforge.model.saving import load_vlm, save_vlm

    cfg = load_recipe(None, ["model.projector.pool_size=4"])
    model = tiny_model(tok, "model.projector.pool_size=4")
    save_vlm(model, tok, cfg, tmp_path / "ck")
    assert {p.name for p in (tmp_path / "ck").iterdir()} >= {"model.safetensors", "config.yaml", "tokenizer"}
    loaded, tok2, cfg2 = load_vlm(tmp_path / "ck")
    assert loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight  # tie kept
    batch, _ = packed_batch(model)
    assert torch.equal(model(**batch), loaded(**batch))
    assert len(tok2) == len(tok)
    # low-to-high resolution: the same checkpoint at the full grid
    full, _, _ = load_vlm(tmp_path / "ck", ["model.projector.pool_size=null"])
    assert full.tokens_per_image == 64


def test_pretrained_folders_load_through_from_pretrained(tok, tmp_path):
    """Real checkpoints go through from_pretrained (local folder here; a hub id works the same)."""
    import shutil

    from vlmforge.config import load_recipe
    from vlmforge.model.build import build_vlm
    from vlmforge.model.saving import load_vlm, save_vlm

    donor = tiny_model(tok, seed=1)
    donor.vision.save_pretrained(tmp_path / "vision")
    donor.llm.save_pretrained(tmp_path / "llm")
    cfg = load_recipe(None, [f"model.vision.pretrained={tmp_path / 'vision'}", f"model.llm.pretrained={tmp_path / 'llm'}"])
    model = build_vlm(cfg.model, tok).eval()
    for name in ("vision", "llm"):
        ref = getattr(donor, name).state_dict()
        got = getattr(model, name).state_dict()
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert not cfg.model.trust_remote_code
    # the checkpoint folder is self-contained: it loads after the pretrained folders are gone
    save_vlm(model, tok, cfg, tmp_path / "ck")
    shutil.rmtree(tmp_path / "vision")
    shutil.rmtree(tmp_path / "llm")
    loaded, _, _ = load_vlm(tmp_path / "ck")
    batch, _ = packed_batch(model)
    assert torch.equal(model(**batch), loaded(**batch))


def test_qk_init_std_redraws_only_query_and_key_weights(tok, tmp_path):
    """model.llm.qk_init_std changes the random LM's W_Q and W_K (to that std) and nothing else;
    a pretrained LM refuses it (its weights are not an initialisation to change)."""
    from vlmforge.config import load_recipe
    from vlmforge.model.build import build_vlm

    base = tiny_model(tok, seed=3).llm.state_dict()
    wide = tiny_model(tok, "model.llm.qk_init_std=0.5", seed=3).llm.state_dict()
    qk = [k for k in base if k.endswith(("q_proj.weight", "k_proj.weight"))]
    assert len(qk) == 2 * tiny_model(tok).llm.config.num_hidden_layers
    for k in base:
        if k in qk:
            assert wide[k].std().item() == pytest.approx(0.5, rel=0.1) and base[k].std().item() < 0.1
        else:
            assert torch.equal(base[k], wide[k]), k
    tiny_model(tok, seed=1).llm.save_pretrained(tmp_path / "llm")
    cfg = load_recipe(None, [f"model.llm.pretrained={tmp_path / 'llm'}", "model.llm.qk_init_std=0.1"])
    with pytest.raises(ConfigError, match="qk_init_std only applies"):
        build_vlm(cfg.model, tok)
    with pytest.raises(ConfigError, match="must be > 0"):
        tiny_model(tok, "model.llm.qk_init_std=0")


def test_tower_from_a_full_siglip_checkpoint_gives_hidden_states_minus_2(tmp_path):
    """google/siglip-* checkpoints are full SigLIP (text + vision): the tower loads from them, and our
    features equal transformers' hidden_states[feature_layer] (before post_layernorm)."""
    from transformers import SiglipConfig, SiglipModel

    from vlmforge.model.tower import build_vision_tower, patch_features

    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    full = SiglipModel(SiglipConfig(vision_config=dict(small, image_size=32, patch_size=8),
                                    text_config=dict(small, vocab_size=100, bos_token_id=1, eos_token_id=2)))
    full.save_pretrained(tmp_path / "siglip")
    cfg = tiny_cfg(f"model.vision.pretrained={tmp_path / 'siglip'}")
    assert visual_tokens_per_image(cfg) == 16
    tower = build_vision_tower(cfg.vision)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hs = full.vision_model(x, output_hidden_states=True).hidden_states
        for layer in (-1, -2, 1):
            assert torch.equal(patch_features(tower, x, layer), hs[layer])


def test_tower_at_another_resolution_interpolates_positions(tok):
    # InternVL3-style: a tower run off its native size (64 -> 80 px: 10x10 grid) -> pixel shuffle -> 5x5 = 25
    model = tiny_model(tok, "model.vision.image_size=80", "model.projector.kind=pixel_shuffle_mlp",
                       "model.attention=document", "model.positions=v2pe")
    assert model.tokens_per_image == 25 and model.preprocess_spec()["size"] == 80
    batch, layout = packed_batch(model)
    assert batch["pixel_values"].shape[-1] == 80
    logits = model(**batch, v2pe_delta=0.5)
    for (r, s, e), ref in per_sample_logits(model, batch, layout, v2pe_delta=0.5):
        assert (logits[r, s:e] - ref).abs().max().item() <= 1e-5


def test_projector_registry_lists_every_projector_class():
    """Every projector class in arch/projectors is in PROJECTORS under its `kind`: a new kind that is
    not registered fails here (and registered kinds answer tokens / from_config / export_refusal)."""
    import importlib
    import inspect
    import pkgutil

    from torch import nn

    import vlmforge.arch.projectors as projectors

    found = {}
    for info in pkgutil.iter_modules(projectors.__path__):
        mod = importlib.import_module(f"{projectors.__name__}.{info.name}")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == mod.__name__:
                found[cls.__dict__.get("kind", f"<{cls.__name__} has no kind>")] = cls
    assert found == projectors.PROJECTORS
    # the schema's choices for model.projector.kind are exactly the registered kinds
    from typing import get_args, get_type_hints

    from vlmforge.config.model import ProjectorConfig

    assert set(get_args(get_type_hints(ProjectorConfig)["kind"])) == set(found), (
        "add the new kind to ProjectorConfig.kind in src/vlmforge/config/model.py")
    for kind, cls in found.items():
        assert callable(cls.tokens) and callable(cls.from_config) and callable(cls.export_refusal), kind
        assert cls.tokens(4, None) >= 1
