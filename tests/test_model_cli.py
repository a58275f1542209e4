"""The model commands, in-process: model-info (real architectures on the meta device), generate, export."""

from __future__ import annotations

import json

import pytest
from fixtures_model import tiny_model
from PIL import Image

from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.text.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def ckpt(tiny_tokenizer_dir, tmp_path_factory):
    from vlmforge.model.saving import save_vlm

    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = load_recipe("tiny/model")
    model = tiny_model(tok, "model.projector.pool_size=4")
    out = tmp_path_factory.mktemp("ckpt")
    save_vlm(model, tok, cfg, out)
    return out


def test_model_info_open_qwen2vl_matches_published_sizes(capsys):
    assert main(["model-info", "--recipe", "open_qwen2vl/model", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    llm, vision = info["params"]["llm"], info["params"]["vision"]
    assert 1.50e9 < llm["total"] < 1.56e9  # Qwen2.5-1.5B: 1.54B with tied embeddings
    assert 0.40e9 < vision["total"] < 0.43e9  # SigLIP so400m tower without its pooling head
    assert vision["trainable"] == 0 and llm["trainable"] == llm["total"]
    assert info["params"]["projector"]["total"] == 1152 * 1536 + 1536 + 1536 * 1536 + 1536
    assert info["visual_tokens_per_image"] == 144 and info["patch_grid"] == 27
    assert info["flops"]["llm_per_token"] > 6 * 1.3e9
    # low-to-high resolution is a run setting
    assert main(["model-info", "--recipe", "open_qwen2vl/model", "--set", "model.projector.pool_size=null", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["visual_tokens_per_image"] == 729


def test_model_info_internvl3_style_table(capsys):
    assert main(["model-info", "--recipe", "internvl3/model"]) == 0
    out = capsys.readouterr().out
    assert "32x32 patches" in out and "256 visual tokens per image" in out and "v2pe" in out
    assert "formula:" in out


def test_model_info_image_sizes_under_internvl3_tiles(capsys, tiny_tokenizer_dir):
    """448-px tiles, at most 12 per image, thumbnail: a 1024x768 image (aspect 4:3) gets the 4x3
    grid (12 tiles, the exact aspect) + the thumbnail = 13 tiles x 256 tokens = 3328 visual tokens.
    Shown with a 448x448 image in one sample, the budget is 12 // 2 = 6 each: 1024x768 -> 3x2
    (aspect 1.5 is the closest to 1.33 among grids of <= 6 tiles) + thumbnail = 7 tiles; 448x448
    -> 1x1 (2x2 ties on aspect but the image covers less than half of its 4 tiles), no thumbnail."""
    assert main(["model-info", "--recipe", "internvl3/sft", "--image-size", "1024x768", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["image_costs"]
    assert (c["tiles"], c["tile"], c["max_tiles"], c["tokens_per_tile"]) == (True, 448, 12, 256)
    (one,) = c["images"]
    assert (one["grid"], one["tiles"], one["thumbnail"], one["visual_tokens"]) == ([4, 3], 13, True, 3328)
    assert c["wrap_tokens"] is None and one["tokens"] is None  # Qwen's tokenizer is not a local folder here
    assert main(["model-info", "--recipe", "internvl3/sft", "--image-size", "1024x768,448x448",
                 "--tokenizer", tiny_tokenizer_dir, "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["image_costs"]
    tok = load_tokenizer(tiny_tokenizer_dir)
    wrap = len(tok.encode("<img>", add_special_tokens=False)) + len(tok.encode("</img>", add_special_tokens=False))
    assert c["wrap_tokens"] == wrap and c["images"][0]["tokens"] == 3328 + wrap
    s = c["sample"]
    assert s["budget_per_image"] == 6
    assert [(r["grid"], r["tiles"]) for r in s["images"]] == [([3, 2], 7), ([1, 1], 1)]
    assert (s["tiles"], s["visual_tokens"], s["tokens"]) == (8, 8 * 256, 8 * 256 + 2 * wrap)
    assert main(["model-info", "--recipe", "internvl3/sft", "--image-size", "1024x768"]) == 0
    out = capsys.readouterr().out
    assert "1024x768: grid 4x3 = 12 tile(s) + thumbnail -> 13 tile(s), 3328 visual tokens" in out
    assert "give --tokenizer" in out
    # a fixed-grid recipe: one tile whatever the size
    assert main(["model-info", "--recipe", "internvl3/model", "--image-size", "1024x768", "--json"]) == 0
    (one,) = json.loads(capsys.readouterr().out)["image_costs"]["images"]
    assert (one["grid"], one["tiles"], one["visual_tokens"]) == ([1, 1], 1, 256)
    assert main(["model-info", "--recipe", "internvl3/sft", "--image-size", "1024by768"]) == 2
    assert "--image-size '1024by768': expected WIDTHxHEIGHT" in capsys.readouterr().err


def test_model_info_names_the_budget_rule_it_uses(capsys):
    """share_budget=false: each of a sample's images gets all 12 tiles (1024x768 -> 4x3 + thumbnail
    = 13, as alone), and the text does not claim the budget is shared."""
    sizes = ["--image-size", "1024x768,448x448"]
    assert main(["model-info", "--recipe", "internvl3/sft", *sizes]) == 0
    assert "per image (shared over a sample's images)" in capsys.readouterr().out
    own = ["--set", "model.images.share_budget=false"]
    assert main(["model-info", "--recipe", "internvl3/sft", *sizes, *own]) == 0
    out = capsys.readouterr().out
    assert "shared over" not in out and "1..12 per image (each image of a sample, not shared)" in out
    assert "together in one sample (at most 12 tiles each)" in out
    assert main(["model-info", "--recipe", "internvl3/sft", *sizes, *own, "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["image_costs"]
    assert c["share_budget"] is False and [r["tiles"] for r in c["sample"]["images"]] == [13, 1]


def test_generate_command(ckpt, tmp_path, capsys):
    img = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(img)
    assert main(["generate", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "What is in the picture?",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "<image><image> compare"]) == 2
    assert "2 <image> marker(s) but 1 --image" in capsys.readouterr().err


def test_export_command_refuses_pooled_then_exports_full_grid(ckpt, tmp_path, capsys):
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "a")]) == 2
    assert "has no pooling" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "b"), "--set", "model.projector.pool_size=null"]) == 0
    names = {p.name for p in (tmp_path / "b").iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer.json", "chat_template.jinja"} <= names
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["vision_feature_select_strategy"] == "full" and cfg["vision_feature_layer"] == -2
    assert cfg["image_seq_length"] == 64
