"""The InternVL format in and out: a tiny random transformers InternVL folder (InternViT + the pixel-shuffle
projector + Qwen2, the published key names, tokenizer with <img> / </img> / <IMG_CONTEXT>, InternVL3-hf's
processor files) imports to a vlmforge checkpoint that tiles as transformers' processor does (model.images:
tiles, <img> / </img> around each image); on one tile and on tiled images (grids of several tiles plus a
thumbnail) vlmforge's own ids and pixels (prompt_ids, tile_images) are the processor's and its logits
equal transformers' to 1e-5. Exported back, the folder through transformers alone (its processor,
AutoModelForImageTextToText, generate) gives the same ids, pixels, logits and greedy tokens as vlmforge.

transformers' InternVLProcessor holds a video processor, and transformers builds video processors
with torchvision only, which is not installed here: AutoProcessor.from_pretrained fails at
InternVLVideoProcessor, and InternVLProcessor refuses video_processor=None
(test_auto_processor_needs_torchvision). The tests build InternVLProcessor as from_pretrained does,
from the folder's own files (get_processor_dict, the image processor, the tokenizer), with a bare
VideoProcessorMixin in the video slot; everything it does to images and text is then transformers'
own code. The image processor is loaded with the PIL backend (what AutoImageProcessor picks without
torchvision; with it, it would pick the torchvision one, whose resize can differ in the last bits).
"""

from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest
import torch
from fixtures_model import tiny_model
from fixtures_tokenizer import shape_sentences
from fixtures_train import one_torch_thread, write_sft_json
from PIL import Image
from torch import nn

from vlmforge.arch.tiles import Tiling
from vlmforge.cli import main
from vlmforge.images import dynamic_tiles, preprocess_batch, tile_images
from vlmforge.model.decoding import generate, prompt_ids
from vlmforge.model.export import ExportRefused, export_llava
from vlmforge.model.internvl_format import export_internvl, split_layout, with_image_layout
from vlmforge.model.saving import load_vlm
from vlmforge.model.tower import patch_features
from vlmforge.text.tokenization import load_tokenizer

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8, attention_bias=True)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TOKENS = 4  # 32 px / 8 px patches = 4 x 4 grid -> 2 x 2 after pixel shuffle
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
QUESTION = "What colour is the square?"
MSGS = [{"role": "user", "content": "<image>\n" + QUESTION}]  # vlmforge's string form
PARTS = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]  # a client's
# transformers' InternVL chat template (convert_internvl_weights_to_hf.py), an image part written as the
# context token InternVLProcessor expands
HF_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


def spread_(module: nn.Module, seed: int, std: float = 0.2) -> None:
    """Re-draw every weight matrix (and the CLS / position embeddings) with a larger std."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def square_image(w: int = 32, h: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def processor_of(folder, monkeypatch):
    """transformers' InternVLProcessor of `folder` (see the module docstring)."""
    from transformers import AutoImageProcessor, AutoTokenizer, InternVLProcessor, processing_utils
    from transformers.video_processing_utils import VideoProcessorMixin

    # the class check InternVLProcessor runs on its video slot looks this name up in transformers,
    # which exports it only with torchvision
    monkeypatch.setattr(processing_utils.transformers_module, "VideoProcessorMixin", VideoProcessorMixin, raising=False)
    processor_dict, kwargs = InternVLProcessor.get_processor_dict(str(folder), local_files_only=True)
    args = [AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, backend="pil"),
            AutoTokenizer.from_pretrained(str(folder), local_files_only=True), VideoProcessorMixin()]
    return InternVLProcessor.from_args_and_dict(args, processor_dict, **kwargs)


# ---------------------------------------------------------------- a tiny published-layout InternVL folder


@pytest.fixture(scope="module")
def internvl_tok_dir(tmp_path_factory):
    """A Qwen-shaped tokenizer with InternVL's image tokens (no <image>), named as transformers names them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(shape_sentences(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    raw = tmp_path_factory.mktemp("internvl_tok_raw")
    tok.save_pretrained(str(raw))
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = AutoTokenizer.from_pretrained(str(raw), extra_special_tokens=named)
    tok.extra_special_tokens = specials[1:]
    tok.chat_template = HF_TEMPLATE
    out = tmp_path_factory.mktemp("internvl_tok")
    tok.save_pretrained(str(out))
    return out


def make_internvl(path, tok_dir, tied: bool = True, max_patches: int = 12, **overrides):
    """A random InternVLForConditionalGeneration saved as transformers saves it, with the tokenizer and
    InternVL3-hf's processor files (GotOcr2 image processor, ImageNet statistics, up to 12 tiles)."""
    from transformers import (
        AutoTokenizer,
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
    )

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    text = Qwen2Config(**TEXT, vocab_size=len(tok) + 6, tie_word_embeddings=tied)  # a padded vocabulary
    cfg = InternVLConfig(vision_config=InternVLVisionConfig(**VISION).to_dict(), text_config=text.to_dict(),
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=TOKENS,
                         tie_word_embeddings=tied)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(cfg).eval()
    spread_(model, 1)
    if tied:
        model.tie_weights()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=IMAGENET[0], image_std=IMAGENET[1],
                                  max_patches=max_patches)
    (path / "preprocessor_config.json").write_text(ip.to_json_string())
    (path / "processor_config.json").write_text(json.dumps({"image_seq_length": TOKENS, "processor_class": "InternVLProcessor"}))
    return model, tok


@pytest.fixture(scope="module")
def imported(tmp_path_factory, internvl_tok_dir):
    """(source folder, transformers model, vlmforge checkpoint folder) for tied and untied LM heads."""
    out = {}
    for tied in (True, False):
        root = tmp_path_factory.mktemp(f"internvl_{'tied' if tied else 'untied'}")
        hf, _ = make_internvl(root / "src", internvl_tok_dir, tied)
        assert main(["import", "--from", str(root / "src"), "--out", str(root / "ckpt")]) == 0
        out[tied] = (root / "src", hf, root / "ckpt")
    return out


def swap_context(ids: list[int], theirs: int, ours: int) -> list[int]:
    return [ours if i == theirs else i for i in ids]


def our_pixels(model, tok, images) -> torch.Tensor:
    """vlmforge's tower inputs for one prompt's images: its layout's tiles, preprocessed."""
    return preprocess_batch(tile_images(list(images), model.image_layout(tok)), model.preprocess_spec())


def logits_three_ways(model, hf, inputs, ours: list[int], pv=None):
    """(transformers' logits on its processor's inputs, ours on the same pixels, ours on our pixels
    ``pv`` or None): what the import and export checks compare."""
    with torch.no_grad():
        ref = hf(**inputs).logits
        same = model(torch.tensor([ours]), inputs["pixel_values"])
        got = model(torch.tensor([ours]), pv) if pv is not None else None
    return ref, same, got


# Logits from vlmforge's own pixels against transformers' from its processor's: the pixels agree to
# float rounding (1e-6), which the tower and LM amplify; the models agree to 1e-5 on the same pixels.
END_TO_END = 1e-4
# (width, height) of test images whose grids have several tiles: 3 x 1, 2 x 2 (a tie the larger grid
# wins: the image covers more than half of it) and 1 x 3, each with the thumbnail.
TILED = [((96, 32), 4), ((64, 64), 5), ((30, 100), 4)]


# ---------------------------------------------------------------- import


def test_import_takes_the_processors_tiling_and_wrap(imported):
    """model.images from the folder's processor: InternVLProcessor crops to patches on every call
    (the image processor's own crop_to_patches is false, as in InternVL3-hf), 1-12 tiles and a
    thumbnail, each image between <img> and </img>; the chat template itself no longer wraps."""
    _, _, ckpt = imported[True]
    model, tok, cfg = load_vlm(ckpt)
    images = cfg.model.images
    assert (images.tiles, images.min_tiles, images.max_tiles, images.thumbnail) == (True, 1, 12, True)
    assert (images.start, images.end) == ("<img>", "</img>")
    assert model.images.tiles and split_layout(tok.chat_template)[:2] == ("", "")
    layout = model.image_layout(tok)
    assert tok.convert_ids_to_tokens([*layout.start_ids, *layout.end_ids]) == ["<img>", "</img>"]
    assert not images.share_budget  # each image of a prompt gets the whole budget, as the processor gives it
    assert layout.tiles([(96, 32), (32, 32)]) == [4, 1]
    notes = json.loads((ckpt / "manifest.json").read_text())["notes"]
    assert any("tiled as InternVLProcessor tiles them: 1-12 tiles" in n for n in notes)
    assert any("crop_to_patches false" in n for n in notes)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_import_matches_transformers_on_one_tile(imported, tied, monkeypatch):
    src, hf, ckpt = imported[tied]
    model, tok, cfg = load_vlm(ckpt)
    assert model.projector.kind == "pixel_shuffle_mlp" and model.tokens_per_image == TOKENS
    assert model.vision.config.model_type == "internvl_vision" and model.feature_layer == -1
    assert model.llm.config.tie_word_embeddings == tied
    proc = processor_of(src, monkeypatch)
    image = square_image()
    text = proc.apply_chat_template(PARTS, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 1  # a square image of one tile's size is one tile
    theirs = inputs["input_ids"][0].tolist()
    ours = prompt_ids(model, tok, MSGS, [image])
    # the same ids: <img>, then our <image> where the processor writes <IMG_CONTEXT>, then </img>
    assert ours == swap_context(theirs, hf.config.image_token_id, model.image_token_id)
    start = ours.index(model.image_token_id)
    assert tok.convert_ids_to_tokens([ours[start - 1], ours[start + TOKENS]]) == ["<img>", "</img>"]
    pv = our_pixels(model, tok, [image])
    assert (pv - inputs["pixel_values"]).abs().max().item() <= 1e-5
    ref, same, got = logits_three_ways(model, hf, inputs, ours, pv)
    vocab = ref.shape[-1]
    assert got.shape[-1] >= vocab
    assert (same[..., :vocab] - ref).abs().max().item() <= 1e-5
    assert (got[..., :vocab] - ref).abs().max().item() <= END_TO_END
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["layout"] == "internvl-hf"


@pytest.mark.parametrize("size, n_tiles", TILED, ids=["3x1", "2x2", "1x3"])
def test_import_matches_transformers_on_a_tiled_image(imported, monkeypatch, size, n_tiles):
    """vlmforge's own tiling path on the imported model (prompt_ids with the image, tile_images) writes
    the processor's ids and pixels: one <img> ... </img> run of tiles x tokens, the grid's tiles then the
    thumbnail; the logits equal transformers' to 1e-5."""
    src, hf, ckpt = imported[True]
    model, tok, cfg = load_vlm(ckpt)
    proc = processor_of(src, monkeypatch)
    image = square_image(*size, seed=1)
    text = proc.apply_chat_template(PARTS, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == n_tiles == model.image_layout(tok).tiles([size])[0]
    theirs = inputs["input_ids"][0].tolist()
    ours = prompt_ids(model, tok, MSGS, [image])
    assert ours == swap_context(theirs, hf.config.image_token_id, model.image_token_id)
    assert ours.count(model.image_token_id) == TOKENS * n_tiles
    pv = our_pixels(model, tok, [image])
    assert pv.shape[0] == n_tiles and (pv - inputs["pixel_values"]).abs().max().item() <= 1e-5
    ref, same, got = logits_three_ways(model, hf, inputs, ours, pv)
    assert (same[..., : ref.shape[-1]] - ref).abs().max().item() <= 1e-5
    assert (got[..., : ref.shape[-1]] - ref).abs().max().item() <= END_TO_END


def test_imported_model_tiles_a_two_image_prompt_as_the_processor(imported, monkeypatch):
    """Two images in one prompt: the processor gives each the whole budget (12 tiles), and so does the
    imported model (share_budget false): same ids, same pixels, same logits; with InternVL's shared
    training budget the 12:1 image would get fewer tiles."""
    src, hf, ckpt = imported[True]
    model, tok, cfg = load_vlm(ckpt)
    proc = processor_of(src, monkeypatch)
    images = [square_image(384, 32, seed=1), square_image(64, 64, seed=2)]
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]}]
    msgs = [{"role": "user", "content": "<image>\n<image>\n" + QUESTION}]
    text = proc.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=images, text=[text], return_tensors="pt")
    ours = prompt_ids(model, tok, msgs, images)
    assert ours == swap_context(inputs["input_ids"][0].tolist(), hf.config.image_token_id, model.image_token_id)
    pv = our_pixels(model, tok, images)
    assert pv.shape == inputs["pixel_values"].shape and (pv - inputs["pixel_values"]).abs().max().item() <= 1e-5
    ref, same, _ = logits_three_ways(model, hf, inputs, ours)
    assert (same[..., : ref.shape[-1]] - ref).abs().max().item() <= 1e-5
    shared, tok2, _ = load_vlm(ckpt, overrides=["model.images.share_budget=true"])
    sizes = [im.size for im in images]
    assert model.image_layout(tok).tiles(sizes) == [13, 5] and shared.image_layout(tok2).tiles(sizes) == [7, 5]


def test_imported_model_preprocesses_as_the_source(imported, monkeypatch):
    src, _, ckpt = imported[True]
    model, _, _ = load_vlm(ckpt)
    proc = processor_of(src, monkeypatch)
    image = square_image(seed=2)
    inputs = proc(images=[image], text=["<IMG_CONTEXT>"], return_tensors="pt")
    assert (preprocess_batch([image], model.preprocess_spec()) - inputs["pixel_values"]).abs().max().item() <= 1e-5


def test_one_tile_source_imports_untiled(internvl_tok_dir, tmp_path):
    """A processor with max_patches 1 feeds each image as one tile: model.images.tiles stays false
    (and the wrap is still InternVL's)."""
    make_internvl(tmp_path / "src", internvl_tok_dir, max_patches=1)
    assert main(["import", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 0
    model, tok, cfg = load_vlm(tmp_path / "ckpt")
    assert not cfg.model.images.tiles and (cfg.model.images.start, cfg.model.images.end) == ("<img>", "</img>")
    ids = prompt_ids(model, tok, MSGS, [square_image(96, 32)])
    assert ids.count(model.image_token_id) == TOKENS


def test_imported_checkpoint_fine_tunes(imported, tmp_path):
    """train.init_from takes the imported checkpoint (its own config.yaml as the recipe), as for LLaVA."""
    from safetensors.torch import load_file

    _, _, ckpt = imported[True]
    images = write_sft_json(tmp_path, random.Random(0), n=8)
    index_sft_with(tmp_path, images, ckpt)
    run = tmp_path / "run"
    sets = [f"sft.index={tmp_path / 'index'}", f"sft.image_root={images}", f"train.init_from={ckpt}",
            f"train.run_dir={run}", "train.stage=sft", "train.max_steps=2", "train.global_batch_size=2",
            "train.micro_batch_size=2", "train.progress_bar=false", "train.tensorboard=false", "train.report=false",
            "model.vision.frozen=false", "sft.batching=length_group"]
    assert main(["train", "--recipe", str(ckpt / "config.yaml"), *sum((["--set", s] for s in sets), [])]) == 0
    before, after = load_file(str(ckpt / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert set(before) == set(after)
    assert not torch.equal(before["projector.linear_1.weight"], after["projector.linear_1.weight"])
    assert not torch.equal(before["vision.encoder.layer.0.mlp.fc1.weight"], after["vision.encoder.layer.0.mlp.fc1.weight"])
    model, tok, cfg = load_vlm(run / "final")
    images = cfg.model.images  # the tiling and wrap travel with the checkpoint's recipe
    assert (images.tiles, images.max_tiles, images.start, images.end) == (True, 12, "<img>", "</img>")


def index_sft_with(root, images, ckpt):
    assert main(["sft-index", "--recipe", str(ckpt / "config.yaml"), "--input", str(root / "sft.json"),
                 "--out", str(root / "index"), "--image-root", str(images), "--tokenizer", str(ckpt / "tokenizer"),
                 "--set", "sft.index_workers=1"]) == 0


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"downsample_ratio": 0.25}, "merges 2 x 2 patches"),
        ({"vision_feature_select_strategy": "full"}, "keeps InternViT's CLS"),
        ({"vision_feature_layer": [-2, -1]}, "several layers"),
        ({"projector_hidden_act": "relu"}, "exact GELU"),
        ({"image_token_id": 3}, "not its context token"),  # <img>
        ({"image_seq_length": 16}, "image_seq_length 16"),
        ({"auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}}, "Python files"),
    ],
)
def test_import_refusals(internvl_tok_dir, tmp_path, capsys, overrides, reason):
    make_internvl(tmp_path / "src", internvl_tok_dir)
    cfg_path = tmp_path / "src" / "config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), **overrides)))
    rc = main(["import", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vlmforge import: error:")]
    assert rc == 2 and len(lines) == 1 and reason in lines[0] and "Traceback" not in err
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()


# ---------------------------------------------------------------- export


def check_export(model, tok, folder, monkeypatch, image, n_tiles: int = 1, max_new_tokens: int = 6):
    """The exported folder, through transformers alone (its processor, AutoModelForImageTextToText,
    generate with its generation_config), writes vlmforge's ids and pixels for `image`, gives its
    logits and generates its greedy tokens."""
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True).eval()
    assert type(hf).__name__ == "InternVLForConditionalGeneration"
    proc = processor_of(folder, monkeypatch)
    text = proc.apply_chat_template(PARTS, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    ours = prompt_ids(model, tok, MSGS, [image])
    assert inputs["input_ids"][0].tolist() == ours
    assert ours.count(model.image_token_id) == model.tokens_per_image * n_tiles
    pv = our_pixels(model, tok, [image])
    assert pv.shape[0] == n_tiles and (pv - inputs["pixel_values"]).abs().max().item() <= 1e-5
    ref, same, got = logits_three_ways(model, hf, inputs, ours, pv)
    vocab = got.shape[-1]  # the export may add <video> (one row more, never generated)
    assert ref.shape[-1] >= vocab and (same - ref[..., :vocab]).abs().max().item() <= 1e-5
    assert (got - ref[..., :vocab]).abs().max().item() <= END_TO_END
    new = hf.generate(**inputs, max_new_tokens=max_new_tokens)[0, inputs["input_ids"].shape[1]:].tolist()
    mine = generate(model, tok, [MSGS], [[image]], max_new_tokens=max_new_tokens, return_ids=True)[0]
    assert len(mine) >= 2  # a real answer, not an immediate stop
    stops = set(hf.generation_config.eos_token_id)
    assert [t for t in new if t not in stops] == mine
    return hf


def exported_image_processor(folder) -> dict:
    return json.loads((folder / "processor_config.json").read_text())["image_processor"]


def test_imported_checkpoint_exports_back(imported, tmp_path, monkeypatch):
    """Exported back, the folder tiles as the source did (the processor settings come from
    model.images), answers through transformers alone as vlmforge does on a tiled image, computes the
    source's function, and imports again to the same model and layout."""
    src, source, ckpt = imported[True]
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    ip = exported_image_processor(tmp_path / "hf")
    assert (ip["crop_to_patches"], ip["min_patches"], ip["max_patches"]) == (True, 1, 12)
    model, tok, _ = load_vlm(ckpt)
    for (w, h), n in TILED[:2]:
        check_export(model, tok, tmp_path / "hf", monkeypatch, square_image(w, h, seed=3), n_tiles=n)
    check_export(model, tok, tmp_path / "hf", monkeypatch, square_image(seed=3))
    # the same function as the source: its weights, our <image> standing for <IMG_CONTEXT>
    exported_tok = load_tokenizer(tmp_path / "hf")
    assert [exported_tok.start_image_token, exported_tok.end_image_token, exported_tok.context_image_token] == [
        "<img>", "</img>", "<image>"]
    image = square_image(96, 32, seed=7)
    ids, pv = prompt_ids(model, tok, MSGS, [image]), our_pixels(model, tok, [image])
    with torch.no_grad():
        ref = source(input_ids=torch.tensor([swap_context(ids, model.image_token_id, source.config.image_token_id)]),
                     pixel_values=pv).logits
        got = hf_model(tmp_path / "hf")(input_ids=torch.tensor([ids]), pixel_values=pv).logits
    assert (got[..., : ref.shape[-1]] - ref).abs().max().item() <= 1e-5
    manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert manifest["format"] == "transformers InternVLForConditionalGeneration"
    # and in again: the exported folder imports to the same model and layout
    assert main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "again")]) == 0
    again, again_tok, again_cfg = load_vlm(tmp_path / "again")
    assert again_cfg.model.images == load_vlm(ckpt)[2].model.images
    assert prompt_ids(again, again_tok, MSGS, [image]) == ids
    with torch.no_grad():
        assert (again(torch.tensor([ids]), pv) - model(torch.tensor([ids]), pv)).abs().max().item() <= 1e-6


def hf_model(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True).eval()


def test_checkpoint_imported_before_model_images_exports_as_before(imported, tmp_path, monkeypatch):
    """A checkpoint whose chat template wraps images (the import before model.images) keeps exporting
    <img> / </img> from its template; a wrap in both places is refused."""
    _, _, ckpt = imported[True]
    model, tok, _ = load_vlm(ckpt, ["model.images.tiles=false", "model.images.start=null", "model.images.end=null"])
    tok.chat_template = with_image_layout(tok.chat_template, "<img>", "</img>")
    export_internvl(model, tok, tmp_path / "hf")
    assert exported_image_processor(tmp_path / "hf")["max_patches"] == 1
    exported_tok = load_tokenizer(tmp_path / "hf")
    assert [exported_tok.start_image_token, exported_tok.end_image_token] == ["<img>", "</img>"]
    check_export(model, tok, tmp_path / "hf", monkeypatch, square_image(96, 32, seed=8))  # one tile: untiled
    model.images = load_vlm(ckpt)[2].model.images
    with pytest.raises(ExportRefused, match="wrapped twice"):
        export_internvl(model, tok, tmp_path / "twice")
    assert not (tmp_path / "twice").exists()


def test_auto_processor_needs_torchvision(tok, tmp_path):
    """The exported folder names InternVLProcessor and nests both of its sub-processors' configs, so
    AutoProcessor gets as far as building InternVLVideoProcessor, which needs torchvision; and
    InternVLProcessor cannot be built with no video processor instead."""
    from transformers import AutoProcessor, AutoTokenizer, InternVLProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    from vlmforge.model.internvl_format import image_processor

    model = tiny_model(tok, *INTERNVIT)
    export_internvl(model, tok, tmp_path / "hf")
    video, _ = BaseVideoProcessor.get_video_processor_dict(str(tmp_path / "hf"), local_files_only=True)
    assert video["video_processor_type"] == "InternVLVideoProcessor"
    if HAS_TORCHVISION:
        proc = AutoProcessor.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
        assert type(proc).__name__ == "InternVLProcessor" and proc.image_seq_length == model.tokens_per_image
    else:
        with pytest.raises(ImportError, match="InternVLVideoProcessor requires the Torchvision library"):
            AutoProcessor.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
        exported_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
        # the class check of the video slot looks up transformers' video processor classes, which exist
        # only with torchvision (5.24: AttributeError on VIDEO_PROCESSOR_MAPPING); a None would fail it too
        with pytest.raises((AttributeError, TypeError)):
            InternVLProcessor(image_processor(model), exported_tok, None)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


INTERNVIT = ("model.vision.preset=tiny-internvit", "model.projector.kind=pixel_shuffle_mlp")


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.vision.feature_layer=-1",),
        ("model.vision.feature_layer=-2",),
        ("model.vision.feature_layer=-1", "model.vision.image_size=48"),  # position embeddings interpolated
    ],
    ids=["last", "second-to-last", "interpolated"],
)
def test_native_internvit_model_exports(tok, tmp_path, monkeypatch, overrides):
    """A model trained in vlmforge (no <img> tokens in its tokenizer) exports with empty start / end tokens."""
    model = tiny_model(tok, *INTERNVIT, *overrides, spread=0.2)
    export_internvl(model, tok, tmp_path / "hf")
    assert split_layout(load_tokenizer(tmp_path / "hf").chat_template)[:2] == ("", "")
    size = model.image_size
    check_export(model, tok, tmp_path / "hf", monkeypatch, square_image(size, size, seed=4))


@pytest.mark.parametrize("explicit", [False, True], ids=["model-images", "tiling-arg"])
def test_tiled_processor_export(tok, tmp_path, monkeypatch, explicit):
    """A vlmforge model that tiles (model.images, or an explicit Tiling) exports a processor that cuts
    vlmforge's tiles; transformers alone then answers a tiled image as vlmforge does."""
    sets = () if explicit else ("model.images.tiles=true", "model.images.max_tiles=6")
    model = tiny_model(tok, *INTERNVIT, "model.vision.feature_layer=-1", *sets, spread=0.2)
    size = model.image_size
    tiling = Tiling(tile=size, max_tiles=6) if explicit else None
    export_internvl(model, tok, tmp_path / "hf", tiling=tiling)
    ip = exported_image_processor(tmp_path / "hf")
    assert (ip["crop_to_patches"], ip["min_patches"], ip["max_patches"]) == (True, 1, 6)
    image = square_image(3 * size, size, seed=5)
    assert len(dynamic_tiles(image, tile=size, max_tiles=6)) == 4
    if explicit:  # vlmforge's own prompts tile as the export does
        model.images = tiny_model(tok, *INTERNVIT, "model.images.tiles=true", "model.images.max_tiles=6").images
    check_export(model, tok, tmp_path / "hf", monkeypatch, image, n_tiles=4)


def test_untiled_export_feeds_one_tile_per_image(tok, tmp_path, monkeypatch):
    """model.images.tiles false: InternVLProcessor still crops to patches, but max_patches 1 keeps a
    wide image one tile, as vlmforge feeds it."""
    model = tiny_model(tok, *INTERNVIT, "model.vision.feature_layer=-1", spread=0.2)
    export_internvl(model, tok, tmp_path / "hf")
    assert exported_image_processor(tmp_path / "hf")["max_patches"] == 1
    check_export(model, tok, tmp_path / "hf", monkeypatch, square_image(3 * model.image_size, model.image_size, seed=6))


@pytest.mark.parametrize(
    "sets, tiling, reason",
    [
        (("model.images.start=Picture",), None, "not one token of the tokenizer"),
        (("model.images.tiles=true", "model.images.thumbnail=false"), None, "without a thumbnail"),
        ((), Tiling(tile=32), "32 px tiles for a tower that runs at 64 px"),
    ],
    ids=["multi-token-start", "no-thumbnail", "tile-size"],
)
def test_export_refuses_layouts_the_processor_cannot_write(tok, tmp_path, sets, tiling, reason):
    model = tiny_model(tok, *INTERNVIT, *sets)
    with pytest.raises(ExportRefused, match=reason):
        export_internvl(model, tok, tmp_path / "hf", tiling=tiling)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("sets, reason", [(("model.images.tiles=true",), "tiles images"),
                                          (("model.images.start=<|im_start|>",), "wraps each image")])
def test_llava_export_refuses_tiles_and_wraps(tok, tmp_path, sets, reason):
    """LLaVA's processor feeds each image as one tile, bare: a model that tiles or wraps is refused
    (and exports as before with the options off, tests/test_export.py)."""
    model = tiny_model(tok, *sets)
    with pytest.raises(ExportRefused, match=reason):
        export_llava(model, tok, tmp_path / "hf")


def test_import_refuses_bad_patch_counts(internvl_tok_dir, tmp_path, capsys):
    make_internvl(tmp_path / "src", internvl_tok_dir)
    path = tmp_path / "src" / "preprocessor_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), min_patches=4, max_patches=2)))
    rc = main(["import", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert rc == 2 and "preprocessor_config.json: min_patches 4 is above max_patches 2" in err
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "overrides, fmt, reason",
    [
        (("model.projector.kind=pixel_shuffle_mlp",), "auto", "always builds InternViT"),
        (("model.vision.preset=tiny-internvit", "model.projector.kind=mlp"), "internvl", "InternVL's is pixel_shuffle_mlp"),
        ((*INTERNVIT, "model.positions=v2pe", "model.v2pe_delta=0.25"), "auto", "V2PE"),
    ],
    ids=["siglip-tower", "mlp-projector", "v2pe"],
)
def test_unmappable_models_are_refused(tok, tmp_path, capsys, overrides, fmt, reason):
    from vlmforge.config import load_recipe
    from vlmforge.model.saving import save_vlm

    model = tiny_model(tok, *overrides)
    with pytest.raises(ExportRefused, match=reason):
        export_internvl(model, tok, tmp_path / "direct")
    assert not (tmp_path / "direct").exists()
    save_vlm(model, tok, load_recipe(None, list(overrides)), tmp_path / "ckpt")
    rc = main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--format", fmt])
    err = capsys.readouterr().err
    assert rc == 2 and reason in err and "InternVLForConditionalGeneration" in err


# ---------------------------------------------------------------- the tower


@pytest.mark.parametrize("layer", [-1, -2, 1])
def test_internvit_features_are_transformers_hidden_states(tok, layer):
    """hidden_states[layer] without CLS; -1 is the tower's last_hidden_state, as InternVL reads it."""
    model = tiny_model(tok, *INTERNVIT, f"model.vision.feature_layer={layer}")
    pv = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.vision(pixel_values=pv, output_hidden_states=True)
        ref = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        got = patch_features(model.vision, pv, layer)
    assert got.shape == (2, 64, 64)
    assert (got - ref[:, 1:]).abs().max().item() <= 1e-6


def test_internvit_300m_preset_is_the_published_size():
    from vlmforge.config import load_recipe
    from vlmforge.model.build import build_meta_vlm

    cfg = load_recipe(None, ["model.vision.preset=internvit-300m-448px", "model.projector.kind=pixel_shuffle_mlp",
                             "model.vision.feature_layer=-1"])
    model = build_meta_vlm(cfg.model)
    assert model.tokens_per_image == 256  # 448 px / 14 = 32 x 32 patches -> 16 x 16
    assert 300e6 < sum(p.numel() for p in model.vision.parameters()) < 310e6  # InternViT-300M
