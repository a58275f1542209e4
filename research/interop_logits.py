"""Max |logit difference| of vlmforge vs transformers: exported LLaVA folders (3 geometries) and imported
llava-hf / LLaVA-repo checkpoints (4 layouts), on the tests' tiny random models. Run from the repo root:

    python research/interop_logits.py
"""

import os
import pathlib
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, "tests")  # the tests' tiny-model builders

import test_import_llava as T
import torch
from fixtures_model import tiny_model
from fixtures_tokenizer import shape_sentences
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmforge.cli import main
from vlmforge.model.export import export_llava
from vlmforge.model.saving import load_vlm
from vlmforge.text.tokenization import load_tokenizer, train_tokenizer

root = pathlib.Path(tempfile.mkdtemp())
tiny = root / "tiny_tok"
train_tokenizer(shape_sentences(), tiny, vocab_size=512, min_frequency=2)
plain = T.plain_tok_dir.__wrapped__(type("F", (), {"mktemp": lambda self, n: root / n if (root / n).mkdir() is None else None})())
for tower, tied in (("siglip", False), ("clip", True)):
    d = root / f"hf_{tower}"
    hf, tok = T.make_llava_hf(d / "src", tiny, tower, tied)
    assert main(["import", "--from", str(d / "src"), "--out", str(d / "ckpt")]) == 0
    model, _, _ = load_vlm(d / "ckpt")
    worst = 0.0
    for s in range(5):
        ids = T.text_ids(tok, "Is there a red circle?") + [hf.config.image_token_index] * 16 + T.text_ids(tok, "Yes.")
        pv = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(s))
        with torch.no_grad():
            worst = max(worst, (model(torch.tensor([ids]), pv) - hf(input_ids=torch.tensor([ids]), pixel_values=pv).logits).abs().max().item())
    print(f"llava-hf {tower} ({'tied' if tied else 'untied'}): max |dlogit| = {worst:.3g}")
for case, c in T.REPO_CASES.items():
    d = root / f"repo_{case}"
    lm, tower, proj, tok = T.make_llava_repo(d / "src", d / "tower", plain, case)
    assert main(["import", "--from", str(d / "src"), "--vision-tower", str(d / "tower"), "--out", str(d / "ckpt")]) == 0
    model, our_tok, _ = load_vlm(d / "ckpt")
    n = model.tokens_per_image
    worst = 0.0
    for s in range(5):
        pre, post = T.text_ids(tok, "What colour is the star?"), T.text_ids(tok, "The star is red.")
        pv = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(s))
        ref = T.reference_logits(lm, tower, proj, c["select_layer"], c["tower"] == "clip", pre + [-200] + post, pv)
        with torch.no_grad():
            ours = model(torch.tensor([pre + [model.image_token_id] * n + post]), pv)
        worst = max(worst, (ours[..., : len(tok)] - ref).abs().max().item())
    print(f"llava-repo {case} ({c['tower']}, {c['lm']}, {c['fmt']}): max |dlogit| = {worst:.3g}")
    if case == "aapool_mlp":
        from PIL import Image
        Image.new("RGB", (40, 30), (200, 30, 40)).save(root / "img.png")
        main(["generate", "--ckpt", str(d / "ckpt"), "--image", str(root / "img.png"), "--prompt", "What colour?", "--max-new-tokens", "5"])

# export: vlmforge model -> LLaVA folder, driven by transformers with a content-part message

tok = load_tokenizer(tiny)
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
for name, ov in [("siglip-avgpool-full", ("model.projector.kind=avgpool_mlp",)),
                 ("siglip-last-layer", ("model.projector.kind=mlp", "model.vision.feature_layer=-1")),
                 ("clip", ("model.vision.preset=tiny-clip", "model.projector.kind=mlp"))]:
    model = tiny_model(tok, *ov, spread=0.2)
    export_llava(model, tok, root / f"export_{name}")
    hf = AutoModelForImageTextToText.from_pretrained(root / f"export_{name}", local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(root / f"export_{name}", local_files_only=True)
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[Image.new("RGB", (90, 70), (200, 30, 40))], text=[text], return_tensors="pt")
    with torch.no_grad():
        diff = (hf(**inputs).logits - model(inputs["input_ids"], inputs["pixel_values"])).abs().max().item()
    print(f"export {name}: max |dlogit| = {diff:.3g}")
