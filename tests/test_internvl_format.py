"""The InternVL format in and out: a tiny random transformers InternVL folder (InternViT + the pixel-shuffle
projector + Qwen2, the published key names, tokenizer with <img> / </img> / <IMG_CONTEXT>) imports to a
vlmforge checkpoint whose logits equal transformers' on one tile and on a tiled image; exported back,
transformers gives the same logits and, through the processor and generate, the same tokens as vlmforge.

transformers' InternVLProcessor holds a video processor, and transformers builds video processors
with torchvision only, which is not installed here: AutoProcessor.from_pretrained fails at
InternVLVideoProcessor (test_auto_processor_needs_torchvision). The tests build InternVLProcessor as
from_pretrained does, from the folder's own files (get_processor_dict, the image processor, the
tokenizer), with a bare VideoProcessorMixin in the video slot; everything it does to images and text
is then transformers' own code. The image processor is loaded with the PIL backend (what
AutoImageProcessor picks without torchvision; with it, it would pick the torchvision one).
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
from vlmforge.images import dynamic_tiles, preprocess_batch
from vlmforge.model.decoding import generate, prompt_ids
from vlmforge.model.export import ExportRefused
from vlmforge.model.internvl_format import export_internvl, split_layout
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


def make_internvl(path, tok_dir, tied: bool = True, **overrides):
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
                                  max_patches=12)
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


# ---------------------------------------------------------------- import


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_import_matches_transformers_on_one_tile(imported, tied, monkeypatch):
    src, hf, ckpt = imported[tied]
    model, tok, cfg = load_vlm(ckpt)
    assert model.projector.kind == "pixel_shuffle_mlp" and model.tokens_per_image == TOKENS
    assert model.vision.config.model_type == "internvl_vision" and model.feature_layer == -1
    assert model.llm.config.tie_word_embeddings == tied
    proc = processor_of(src, monkeypatch)
    text = proc.apply_chat_template(PARTS, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[square_image()], text=[text], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 1  # a square image is one tile
    theirs = inputs["input_ids"][0].tolist()
    ours = prompt_ids(model, tok, MSGS, 1)
    # the same ids: <img>, then our <image> where the processor writes <IMG_CONTEXT>, then </img>
    assert ours == swap_context(theirs, hf.config.image_token_id, model.image_token_id)
    start = ours.index(model.image_token_id)
    assert tok.convert_ids_to_tokens([ours[start - 1], ours[start + TOKENS]]) == ["<img>", "</img>"]
    with torch.no_grad():
        ref = hf(**inputs).logits
        got = model(torch.tensor([ours]), inputs["pixel_values"])
    vocab = ref.shape[-1]
    assert got.shape[-1] >= vocab
    assert (got[..., :vocab] - ref).abs().max().item() <= 1e-5
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["layout"] == "internvl-hf"
    assert any("tiles images" in n for n in manifest["notes"])  # the source tiles, vlmforge feeds one tile


def test_import_matches_transformers_on_a_tiled_image(imported, monkeypatch):
    """Several tiles of one image (3 x 1 grid + thumbnail) are several tiles of pixel_values behind one
    <img> ... </img> run; InternVL's tiles are vlmforge.images.dynamic_tiles' tiles."""
    src, hf, ckpt = imported[True]
    model, tok, cfg = load_vlm(ckpt)
    proc = processor_of(src, monkeypatch)
    image = square_image(96, 32, seed=1)
    text = proc.apply_chat_template(PARTS, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    tiles = dynamic_tiles(image, tile=32, max_tiles=12)
    assert inputs["pixel_values"].shape[0] == len(tiles) == 4
    spec = dict(size=32, mean=IMAGENET[0], std=IMAGENET[1], rescale=1 / 255)
    assert (preprocess_batch(tiles, spec) - inputs["pixel_values"]).abs().max().item() <= 1e-5
    theirs = inputs["input_ids"][0].tolist()
    assert theirs.count(hf.config.image_token_id) == TOKENS * len(tiles)
    ours = swap_context(theirs, hf.config.image_token_id, model.image_token_id)
    with torch.no_grad():
        ref = hf(**inputs).logits
        got = model(torch.tensor([ours]), inputs["pixel_values"])
    assert (got[..., : ref.shape[-1]] - ref).abs().max().item() <= 1e-5


def test_imported_model_preprocesses_as_the_source(imported, monkeypatch):
    src, _, ckpt = imported[True]
    model, _, _ = load_vlm(ckpt)
    proc = processor_of(src, monkeypatch)
    image = square_image(seed=2)
    inputs = proc(images=[image], text=["<IMG_CONTEXT>"], return_tensors="pt")
    assert (preprocess_batch([image], model.preprocess_spec()) - inputs["pixel_values"]).abs().max().item() <= 1e-5


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
    model, tok, _ = load_vlm(run / "final")
    assert split_layout(tok.chat_template)[:2] == ("<img>", "</img>")  # the layout travels with the tokenizer


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
    """The exported folder, through transformers alone, writes vlmforge's ids and pixels, gives its
    logits and generates its tokens."""
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True).eval()
    assert type(hf).__name__ == "InternVLForConditionalGeneration"
    proc = processor_of(folder, monkeypatch)
    text = proc.apply_chat_template(PARTS, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    ours = prompt_ids(model, tok, MSGS, 1)
    if n_tiles > 1:  # vlmforge's prompts expand an image to one tile today: n tiles are n x the tokens
        at = ours.index(model.image_token_id)
        t = model.tokens_per_image
        ours = ours[:at] + [model.image_token_id] * (t * n_tiles) + ours[at + t:]
    assert inputs["input_ids"][0].tolist() == ours
    tiles = dynamic_tiles(image, tile=model.image_size) if n_tiles > 1 else [image]
    assert (preprocess_batch(tiles, model.preprocess_spec()) - inputs["pixel_values"]).abs().max().item() <= 1e-5
    with torch.no_grad():
        ref = hf(**inputs).logits
        got = model(inputs["input_ids"], inputs["pixel_values"])
    vocab = got.shape[-1]  # the export may add <video> (one row more, never generated)
    assert ref.shape[-1] >= vocab and (got - ref[..., :vocab]).abs().max().item() <= 1e-5
    if n_tiles == 1:
        new = hf.generate(**inputs, max_new_tokens=max_new_tokens)[0, inputs["input_ids"].shape[1]:].tolist()
        mine = generate(model, tok, [MSGS], [[image]], max_new_tokens=max_new_tokens, return_ids=True)[0]
        assert len(mine) >= 2  # a real answer, not an immediate stop
        stops = set(hf.generation_config.eos_token_id)
        assert [t for t in new if t not in stops] == mine
    return hf


def test_imported_checkpoint_exports_back(imported, tmp_path, monkeypatch):
    src, source, ckpt = imported[True]
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    model, tok, _ = load_vlm(ckpt)
    hf = check_export(model, tok, tmp_path / "hf", monkeypatch, square_image(seed=3))
    # the same function as the source: its weights, our <image> standing for <IMG_CONTEXT>
    exported_tok = load_tokenizer(tmp_path / "hf")
    assert [exported_tok.start_image_token, exported_tok.end_image_token, exported_tok.context_image_token] == [
        "<img>", "</img>", "<image>"]
    pv = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    ids = prompt_ids(model, tok, MSGS, 1)
    with torch.no_grad():
        ref = source(input_ids=torch.tensor([swap_context(ids, model.image_token_id, source.config.image_token_id)]),
                     pixel_values=pv).logits
        got = hf(input_ids=torch.tensor([ids]), pixel_values=pv).logits
    assert (got[..., : ref.shape[-1]] - ref).abs().max().item() <= 1e-5
    manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert manifest["format"] == "transformers InternVLForConditionalGeneration"
    # and in again: the exported folder imports to the same model
    assert main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "again")]) == 0
    again, again_tok, _ = load_vlm(tmp_path / "again")
    assert prompt_ids(again, again_tok, MSGS, 1) == ids
    with torch.no_grad():
        assert (again(torch.tensor([ids]), pv) - model(torch.tensor([ids]), pv)).abs().max().item() <= 1e-6


def test_auto_processor_needs_torchvision(tok, tmp_path):
    """The exported folder names InternVLProcessor and nests both of its sub-processors' configs, so
    AutoProcessor gets as far as building InternVLVideoProcessor, which needs torchvision."""
    from transformers import AutoProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

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


def test_tiled_processor_export(tok, tmp_path, monkeypatch):
    """With a Tiling the exported processor cuts vlmforge.images.dynamic_tiles' tiles; the model reads
    them as consecutive tiles of one image."""
    model = tiny_model(tok, *INTERNVIT, "model.vision.feature_layer=-1", spread=0.2)
    export_internvl(model, tok, tmp_path / "hf", tiling=Tiling(tile=model.image_size, max_tiles=6))
    image = square_image(3 * model.image_size, model.image_size, seed=5)
    n = len(dynamic_tiles(image, tile=model.image_size, max_tiles=6))
    assert n == 4
    check_export(model, tok, tmp_path / "hf", monkeypatch, image, n_tiles=n)


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
