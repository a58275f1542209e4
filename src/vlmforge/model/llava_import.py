"""Import a published LLaVA-family checkpoint as a vlmforge checkpoint folder (the inverse of export).

The layouts are read by :mod:`vlmforge.model.llava_layouts`; here the plan becomes our model: the
tower and LM configs are written as the checkpoint's vision_config.json / llm_config.json, the
model is built from them, every weight is loaded strictly, and save_vlm writes the folder that
eval, generate, train (train.init_from) and curate score (--scorer mlm) load.

The tokenizer comes from the source folder (AutoTokenizer) and gets ``<image>`` if it lacks it:
LLaVA-repo checkpoints mark images with the id -200 in code and ``<image>`` in text, so the new
token's id marks them here; if it lies past the LM's vocabulary, the embedding (and an untied LM
head) grow by rows set to the mean of the existing ones (image positions never read their
embedding). A llava-hf folder's image_token_index must be the tokenizer's ``<image>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.initialization import no_init_weights
from transformers.utils import logging as hf_logging

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.config import load_recipe
from vlmforge.config.loader import set_value
from vlmforge.errors import ConfigError, UserError
from vlmforge.model.build import build_vlm
from vlmforge.model.llava_layouts import ImportPlan, detect_layout, plan_llava_hf, plan_llava_repo, read_config
from vlmforge.model.saving import LLM_CONFIG, VISION_CONFIG, save_vlm
from vlmforge.text.tokenization import image_token_id, prepare_tokenizer

PROCESSOR_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json")


def plan_import(src: Path, vision_tower: Path | None = None) -> ImportPlan:
    cfg = read_config(src)
    layout = detect_layout(src, cfg)
    if layout == "llava-hf":
        if vision_tower is not None:
            raise UserError("--vision-tower is for LLaVA-repository checkpoints; a transformers LLaVA folder holds its tower")
        return plan_llava_hf(src, cfg)
    return plan_llava_repo(src, cfg, vision_tower)


def _processor_template(src: Path) -> str | None:
    for name in PROCESSOR_TEMPLATE_FILES:
        p = src / name
        if not p.is_file():
            continue
        if p.suffix == ".jinja":
            return p.read_text()
        try:
            t = json.loads(p.read_text()).get("chat_template")
        except (ValueError, AttributeError):
            continue
        if isinstance(t, str):
            return t
    return None


def _renders_text(tok, template: str) -> bool:
    """vlmforge renders string content with '<image>' in it; content-part-only templates cannot."""
    try:
        out = tok.apply_chat_template([{"role": "user", "content": "<image>\nQ7X"}], chat_template=template,
                                      tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that does not take string content fails in jinja in many ways
        return False
    return "Q7X" in out


def load_source_tokenizer(path: Path, trust_remote_code: bool, notes: list[str]):
    tc = path / "tokenizer_config.json"
    if tc.is_file() and not trust_remote_code:
        try:
            auto_map = json.loads(tc.read_text()).get("auto_map")
        except ValueError:
            auto_map = None
        if auto_map:
            raise UserError(f"{tc}: the tokenizer is Python code of the folder (auto_map); pass --trust-remote-code to run it")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer warns that config.json's llava_* model_type is not its own
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"no tokenizer in {path} ({str(e).splitlines()[0]}); pass --tokenizer DIR") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tok.chat_template is None:
        template = _processor_template(path)
        if template is not None and _renders_text(tok, template):
            tok.chat_template = template
            notes.append("chat template: the processor's")
        else:
            notes.append("chat template: none usable in the source (string content); vlmforge's Qwen-shaped default")
    had_image = tok.convert_tokens_to_ids(IMAGE_TOKEN) not in (None, tok.unk_token_id)
    tok = prepare_tokenizer(tok)
    if not had_image:
        notes.append(f"added {IMAGE_TOKEN} to the tokenizer (id {image_token_id(tok)})")
    return tok


def _grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.mean(0, keepdim=True).expand(rows - t.shape[0], -1)]) if rows > t.shape[0] else t


def fit_vocab(plan: ImportPlan, n_tokens: int) -> None:
    """Tie the LM head when the source does, and grow the vocabulary to hold every token id."""
    sd, cfg = plan.llm, plan.llm_config
    emb = sd.get("model.embed_tokens.weight")
    if emb is None:
        raise UserError(f"{plan.sources['checkpoint']}: no language-model embeddings (model.embed_tokens.weight)")
    head = sd.get("lm_head.weight")
    tied = head is None or torch.equal(head, emb)
    cfg.tie_word_embeddings = tied
    if getattr(cfg, "get_text_config", None) is not None:
        cfg.get_text_config().tie_word_embeddings = tied
    rows = max(emb.shape[0], n_tokens)
    if rows > emb.shape[0]:
        plan.notes.append(f"vocabulary grown from {emb.shape[0]} to {rows} rows (mean-initialised) for {IMAGE_TOKEN}")
    sd["model.embed_tokens.weight"] = _grow(emb, rows)
    if tied:
        sd.pop("lm_head.weight", None)
    else:
        sd["lm_head.weight"] = _grow(head, rows)
    cfg.vocab_size = rows


def _recipe(plan: ImportPlan, out: Path, name: str, trust_remote_code: bool):
    cfg = load_recipe(None)
    for key, value in (
        ("name", name),
        ("tokenizer.path", str(out / "tokenizer")),
        ("tokenizer.trust_remote_code", trust_remote_code),
        ("model.vision.preset", str(out / VISION_CONFIG)),
        ("model.vision.feature_layer", plan.feature_layer),
        ("model.llm.preset", str(out / LLM_CONFIG)),
        ("model.projector.kind", plan.projector_kind),
        ("model.projector.pool_size", plan.pool_size),
        ("model.trust_remote_code", trust_remote_code),
        ("model.positions", "restart"),
        ("model.attention", "causal"),
    ):
        set_value(cfg, key, value, "import")
    return cfg


def _prefixed(module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tower under this transformers version's names (some keep a `vision_model.` level)."""
    if any(k.startswith("vision_model.") for k in module.state_dict()):
        return {f"vision_model.{k}": v for k, v in sd.items()}
    return sd


def build_imported(plan: ImportPlan, tok, out: Path, name: str, trust_remote_code: bool = False):
    """(model, cfg): our model built from the plan's configs (written into `out`) with the plan's weights."""
    if plan.image_token_id is not None and plan.image_token_id != image_token_id(tok):
        found = tok.convert_ids_to_tokens(plan.image_token_id) if 0 <= plan.image_token_id < len(tok) else None
        raise UserError(
            f"the checkpoint marks images with id {plan.image_token_id} ({found!r} in its tokenizer), but its "
            f"tokenizer's {IMAGE_TOKEN} is id {image_token_id(tok)}; vlmforge marks images with {IMAGE_TOKEN}"
        )
    fit_vocab(plan, len(tok))
    out.mkdir(parents=True, exist_ok=True)
    plan.vision_config.to_json_file(str(out / VISION_CONFIG))
    plan.llm_config.to_json_file(str(out / LLM_CONFIG))
    cfg = _recipe(plan, out, name, trust_remote_code)
    try:
        with no_init_weights():
            model = build_vlm(cfg.model, tok, resize_vocab=False)
    except ConfigError as e:
        raise UserError(f"cannot build the imported model: {e}") from None
    state = {f"vision.{k}": v for k, v in _prefixed(model.vision, plan.vision).items()}
    state.update({f"projector.{k}": v for k, v in plan.projector.items()})
    state.update({f"llm.{k}": v for k, v in plan.llm.items()})
    expected = set(model.state_dict())
    if model.llm.config.tie_word_embeddings:
        expected.discard("llm.lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"the {plan.layout} weights do not map onto the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"the {plan.layout} weights do not fit the configs: {str(e).splitlines()[-1].strip()}") from None
    if model.llm.config.tie_word_embeddings:
        model.llm.tie_weights()
    return model.eval(), cfg


def import_checkpoint(src: Path, out: Path, vision_tower: Path | None = None, tokenizer: Path | None = None,
                      trust_remote_code: bool = False, name: str | None = None):
    """Write a vlmforge checkpoint folder at `out`; returns (model, tokenizer, cfg, plan)."""
    plan = plan_import(src, vision_tower)
    tok = load_source_tokenizer(tokenizer or src, trust_remote_code, plan.notes)
    model, cfg = build_imported(plan, tok, out, name or f"imported-{src.resolve().name}", trust_remote_code)
    save_vlm(model, tok, cfg, out)
    return model, tok, cfg, plan
