"""``curate train-filter``: train a CLIP-style data-filtering network (DFN) on trusted pairs.

The network is a standard transformers ``SiglipModel`` (default; sigmoid loss) or ``CLIPModel``
(softmax contrastive loss), from scratch (tiny config; vision tower shaped like the ``tiny-siglip``
preset) or fine-tuned from a CLIP/SigLIP checkpoint (``--init``). The output folder is an ordinary
``save_pretrained`` folder (safetensors + tokenizer + image processor), so ``curate score --scorer dfn``
and ``--scorer clip`` load it the same way, and a VLM can take its vision tower
(``model.vision.pretrained=<folder>``).

A share of the trusted pairs is held out to calibrate a keep threshold: ``calibration.json`` holds
quantiles of held-out matched-pair scores, ``threshold`` keeps ``calibrate_keep`` of them, and the
share of shuffled (mismatched) held-out pairs that threshold would reject.
Trusted pairs are held in memory (preprocessed uint8 images): size the trusted set accordingly.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import processors
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
)

from vlmforge.arch.geometry import build_image_processor
from vlmforge.config import save_resolved
from vlmforge.config.curate import TrainFilterConfig
from vlmforge.config.recipe import Recipe
from vlmforge.curate.scorers.clip import features, is_siglip, text_inputs
from vlmforge.dist import resolve_device
from vlmforge.errors import UserError
from vlmforge.files import write_json, write_manifest
from vlmforge.imagedecode import ImageDecodeError, decode_image
from vlmforge.shards import iter_raw_samples
from vlmforge.text.tokenization import load_tokenizer, train_tokenizer
from vlmforge.train.finite import require_finite
from vlmforge.train.optim import adamw_with_decay_split, warmup_cosine_scheduler

HINT = "lower curate.train_filter.lr or check the data"  # a non-finite step stops the run


def read_trusted(shards: list[str], exclude: set, max_samples: int | None = None):
    """(images PIL, captions, counts) of decodable, non-excluded samples."""
    images, captions = [], []
    counts = {"read": 0, "excluded": 0, "corrupt": 0, "empty_caption": 0}
    for path in shards:
        for s in iter_raw_samples(path):
            counts["read"] += 1
            if s.key in exclude:
                counts["excluded"] += 1
                continue
            if s.error is not None:
                counts["corrupt"] += 1
                continue
            if not (s.caption or "").strip():
                counts["empty_caption"] += 1
                continue
            try:
                images.append(decode_image(s.image_bytes))
            except ImageDecodeError:
                counts["corrupt"] += 1
                continue
            captions.append(s.caption)
            if max_samples and len(captions) >= max_samples:
                return images, captions, counts
    return images, captions, counts


def add_eos_postprocessor(tokenizer) -> None:
    """Make the tokenizer append EOS to every text (CLIP pools the first EOS; SigLIP ignores it)."""
    eos = tokenizer.eos_token or "<|endoftext|>"
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, eos_id)]
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos


def build_model(tf: TrainFilterConfig, tokenizer):
    vocab = len(tokenizer)
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    common = dict(hidden_size=tf.hidden_size, intermediate_size=4 * tf.hidden_size,
                  num_hidden_layers=tf.num_layers, num_attention_heads=tf.num_heads)
    vision = dict(common, image_size=tf.image_size, patch_size=tf.patch_size, num_channels=3)
    text = dict(common, vocab_size=vocab, max_position_embeddings=tf.max_text_len,
                pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)
    if tf.arch == "siglip":
        vision.update(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        text.update(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=tf.hidden_size)
        return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=tf.embed_dim))


def _pair_scores(model, pixel_values, text, bs=256) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of matched pairs and of pairs with captions rolled by one (mismatched)."""
    model.eval()
    imgs, txts = [], []
    with torch.inference_mode():
        for s in range(0, len(pixel_values), bs):
            imgs.append(features(model.get_image_features(pixel_values=pixel_values[s : s + bs])))
            txts.append(features(model.get_text_features(**{k: v[s : s + bs] for k, v in text.items()})))
    img = torch.nn.functional.normalize(torch.cat(imgs).float(), dim=-1)
    tx = torch.nn.functional.normalize(torch.cat(txts).float(), dim=-1)
    matched = (img * tx).sum(-1)
    rolled = (img * tx.roll(1, dims=0)).sum(-1)
    return matched.numpy(), rolled.numpy()


def train_filter(shards: list[str], out_dir, tf: TrainFilterConfig, exclude: set | None = None, device: str = "auto",
                 config: Recipe | None = None, log=print) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    torch.manual_seed(tf.seed)
    rng = random.Random(tf.seed)

    images, captions, read_counts = read_trusted(shards, exclude or set())
    if len(captions) < 8:
        raise UserError(f"only {len(captions)} usable trusted pairs in {len(shards)} shard(s); need at least 8")
    order = list(range(len(captions)))
    rng.shuffle(order)
    n_hold = max(4, int(len(order) * tf.holdout_frac))
    hold, train = order[:n_hold], order[n_hold:]

    if tf.init:
        model = AutoModel.from_pretrained(tf.init, trust_remote_code=False, dtype=torch.float32)
        image_processor = AutoImageProcessor.from_pretrained(tf.init)
        tokenizer = AutoTokenizer.from_pretrained(tf.init)
        max_len = int(model.config.text_config.max_position_embeddings)
    else:
        if tf.tokenizer:
            tokenizer = load_tokenizer(tf.tokenizer)
        else:
            tokenizer = train_tokenizer([captions[i] for i in train], out / "_tokenizer_tmp",
                                        vocab_size=tf.tokenizer_vocab_size, min_frequency=2)
        add_eos_postprocessor(tokenizer)
        model = build_model(tf, tokenizer)
        image_processor = build_image_processor(tf.arch, tf.image_size)
        max_len = tf.max_text_len
    siglip = is_siglip(model)
    model.to(dev)

    pix = image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = text_inputs(tokenizer, captions, siglip, max_len)
    del images

    # No weight decay on the temperature/bias, norms and biases; the temperature is clamped like
    # CLIP's (scale <= 100): an unclamped one runs away and collapses the embeddings.
    opt = adamw_with_decay_split(model.named_parameters(), tf.lr, tf.weight_decay,
                                 no_decay=lambda n, p: p.ndim < 2 or "logit" in n)
    steps_per_epoch = max(1, len(train) // tf.batch_size)
    sched = warmup_cosine_scheduler(opt, steps_per_epoch * tf.epochs)
    t0 = time.time()
    history = []
    best = None
    for epoch in range(tf.epochs):
        model.train()
        rng.shuffle(train)
        losses = []
        for b in range(steps_per_epoch):
            idx = torch.tensor(train[b * tf.batch_size : (b + 1) * tf.batch_size])
            batch = {k: v[idx].to(dev) for k, v in text.items()}
            loss = model(pixel_values=pix[idx].to(dev), return_loss=True, **batch).loss
            step = epoch * steps_per_epoch + b + 1
            require_finite(step, "loss", loss, hint=HINT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            require_finite(step, "gradient norm", torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), hint=HINT)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
        matched, rolled = _pair_scores(model, pix[hold].to(dev), {k: v[hold].to(dev) for k, v in text.items()})
        thr = float(np.quantile(matched, 1.0 - tf.calibrate_keep))
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
               "holdout_matched_mean": float(matched.mean()), "holdout_mismatched_mean": float(rolled.mean()),
               "holdout_mismatched_rejected": float((rolled < thr).mean())}
        history.append(rec)
        if best is None or rec["holdout_mismatched_rejected"] > best[0]:  # keep the best epoch on held-out trusted pairs
            best = (rec["holdout_mismatched_rejected"], epoch + 1,
                    {k: v.detach().clone() for k, v in model.state_dict().items()})
        log(f"train-filter epoch {epoch + 1}/{tf.epochs}: loss {rec['loss']:.4f}  "
            f"held-out matched {rec['holdout_matched_mean']:.3f} vs shuffled {rec['holdout_mismatched_mean']:.3f}, "
            f"shuffled rejected at keep-{tf.calibrate_keep:.0%} threshold: {rec['holdout_mismatched_rejected']:.1%}")

    model.load_state_dict(best[2])
    matched, rolled = _pair_scores(model, pix[hold].to(dev), {k: v[hold].to(dev) for k, v in text.items()})
    threshold = float(np.quantile(matched, 1.0 - tf.calibrate_keep))
    calibration = {
        "threshold": threshold,
        "keep_frac_of_trusted": tf.calibrate_keep,
        "holdout_pairs": len(hold),
        "holdout_quantiles": {f"q{int(q * 100):02d}": float(np.quantile(matched, q)) for q in (0.01, 0.05, 0.1, 0.25, 0.5)},
        "shuffled_pairs_rejected": float((rolled < threshold).mean()),
        "epoch": best[1],
    }
    model.cpu().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    write_json(out / "calibration.json", calibration)
    tmp_tok = out / "_tokenizer_tmp"
    if tmp_tok.exists():
        shutil.rmtree(tmp_tok)
    if config is not None:
        save_resolved(config, out)  # config.yaml (the recipe); config.json is the model's
    write_manifest(out, "curate.train_filter", inputs=shards, config=config,
                   counts={**read_counts, "trusted_pairs": len(captions), "train": len(train), "holdout": len(hold)},
                   dropped={k: v for k, v in read_counts.items() if k != "read"},
                   calibration=calibration, history=history, seconds=time.time() - t0,
                   model_class=type(model).__name__)
    return calibration
