"""`vlmforge vision-pretrain`: a tiny tower learns the world's labelled objects and becomes a VLM's tower."""

from __future__ import annotations

import json

import pytest
import torch

from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.errors import UserError
from vlmforge.synth.writer import generate_world

WORLD = ["synth.image_size=72", "synth.num_captions=20", "synth.samples_per_shard=20", "synth.num_sft=4",
         "synth.num_mcq=4", "synth.num_vqa=5", "synth.num_pope_images=2", "synth.num_preference=0",
         "synth.num_text=10", "synth.num_vision=400"]


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    generate_world(load_recipe(None, WORLD), root / "world")
    out = root / "tower"
    assert main(["vision-pretrain", "--data", str(root / "world" / "vision"), "--out", str(out), "--epochs", "30",
                 "--no-progress", "--set", "vision_pretrain.batch_size=32"]) == 0
    return root, out


def test_synth_writes_labelled_objects(tower):
    root, _ = tower
    rows = [json.loads(line) for line in (root / "world" / "vision" / "objects.jsonl").read_text().splitlines()]
    assert len(rows) == 400
    assert all((root / "world" / "vision" / r["image"]).is_file() and 1 <= len(r["objects"]) <= 4 for r in rows)
    assert set(rows[0]["objects"][0]) == {"shape", "color", "size", "position"}


def test_tower_learns_every_attribute_on_held_out_images(tower):
    _, out = tower
    man = json.loads((out / "manifest.json").read_text())
    acc = man["holdout_accuracy"]
    # chance on occupied cells: 1/5 shape, 1/7 colour, 1/3 size (each with "none")
    assert acc["color"] >= 0.8 and acc["shape"] >= 0.5 and acc["size"] >= 0.6 and acc["empty"] >= 0.9, acc
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["holdout_shape"] < acc["shape"]  # it learned during training, not by accident of init
    assert json.loads((out / "labels.json").read_text())["vocab"]["shape"][0] == "none"


def test_features_keep_where_each_cell_is(tower):
    """A fresh linear probe on the saved tower's features names the cell of each occupied cell (as a
    pretrained ViT's patch features would); the VLM needs this for "where is ..." questions."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    from vlmforge.model.tower import patch_features
    from vlmforge.vision.pretrain import read_objects

    root, out = tower
    assert json.loads((out / "manifest.json").read_text())["holdout_accuracy"]["position"] >= 0.8  # chance 1/9
    images, labels, _ = read_objects(root / "world" / "vision", grid=3)
    tower_model = CLIPVisionModel.from_pretrained(out).eval()
    pix = AutoImageProcessor.from_pretrained(out)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = patch_features(tower_model, pix, -1)  # [N, 9, D], one patch per cell
    occupied = torch.tensor([[bool(c) for c in cells] for cells in labels])
    x, cell = feats[occupied], torch.arange(9).expand_as(occupied)[occupied]
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    split = len(x) * 3 // 4  # probe fitted on the first images' cells, scored on the rest
    w = torch.linalg.lstsq(x[:split], torch.nn.functional.one_hot(cell[:split], 9).float()).solution
    probe = (x[split:] @ w).argmax(1)
    assert (probe == cell[split:]).float().mean() >= 0.8  # chance 1/9


def test_vlm_takes_the_tower_one_token_per_cell(tower):
    from transformers import CLIPVisionModel

    from vlmforge.model.build import build_vlm
    from vlmforge.model.tower import patch_features
    from vlmforge.text.tokenization import train_tokenizer

    root, out = tower
    tok = train_tokenizer(["a red circle in the top left corner"] * 20, root / "tok", vocab_size=300)
    cfg = load_recipe("demo/sft", [f"model.vision.pretrained={out}"])
    model = build_vlm(cfg.model, tok, seed=0)
    assert model.tokens_per_image == 9
    saved = CLIPVisionModel.from_pretrained(out)
    pix = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        ours = patch_features(model.vision, pix, cfg.model.vision.feature_layer)
        ref = patch_features(saved, pix, -1)
    assert torch.equal(ours, ref)
    assert not any(p.requires_grad for p in model.vision.parameters())  # the demo keeps it frozen


def test_bad_rows_name_file_and_line_and_unreadable_images_are_counted(tmp_path):
    from PIL import Image

    from vlmforge.vision.pretrain import read_objects

    Image.new("RGB", (72, 72), "white").save(tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"<html>not an image</html>")
    good = {"image": "ok.jpg", "objects": [{"shape": "circle", "color": "red", "position": "center"}]}
    (tmp_path / "objects.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps({**good, "image": "broken.jpg"}) + "\n")
    images, labels, counts = read_objects(tmp_path, grid=3)
    assert counts == {"rows": 2, "unreadable_image": 1} and len(images) == 1
    assert labels[0][4] == {"shape": "circle", "color": "red"} and labels[0][0] == {}
    with open(tmp_path / "objects.jsonl", "a") as f:
        f.write(json.dumps({"objects": []}) + "\n")
    with pytest.raises(UserError, match=r"objects\.jsonl:3"):
        read_objects(tmp_path, grid=3)
    with open(tmp_path / "objects.jsonl", "w") as f:
        f.write(json.dumps({**good, "objects": [{"shape": "circle", "position": "upstairs"}]}) + "\n")
    with pytest.raises(UserError, match=r"objects\.jsonl:1.*position"):
        read_objects(tmp_path, grid=3)


def test_init_starts_from_the_given_tower(tower, tmp_path):
    from safetensors.torch import load_file

    root, out = tower
    again = tmp_path / "again"
    # lr 0: training cannot move the weights, so the saved tower is exactly the one it started from
    assert main(["vision-pretrain", "--data", str(root / "world" / "vision"), "--out", str(again), "--epochs", "1",
                 "--no-progress", "--set", f"vision_pretrain.init={out}", "--set", "vision_pretrain.lr=0"]) == 0
    before, after = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_position_names_agree_with_the_synthetic_world():
    from vlmforge.synth.world import CELL_NAMES
    from vlmforge.vision.pretrain import POSITION_NAMES_3X3

    assert POSITION_NAMES_3X3 == CELL_NAMES
