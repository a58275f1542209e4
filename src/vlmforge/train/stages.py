"""From a recipe to the pieces the loop needs, per stage: tokenizer, model, data loader, number of
steps and the final export. Everything a recipe can get wrong beyond its schema (missing paths, a
checkpoint that does not exist, batch sizes that do not divide) is checked by :func:`validate`
before any model is built; the schema itself (choice fields included) is checked when it loads.

Each stage reads its data from one place: pretraining from ``train.data_path`` (packed shards),
SFT from ``sft.index`` (and ``sft.image_root``), MPO from ``preference.index`` (and
``preference.image_root``), starting from ``train.init_from`` (an SFT checkpoint). A process
reward model (stage ``prm``) reads an SFT index too, of critic conversations (``vlmforge
prm-data``'s prm.json), and learns only their '+' / '-' verdict tokens, by next-token prediction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers.initialization import no_init_weights

from vlmforge import dist as vdist
from vlmforge.config.recipe import Recipe, run_seed
from vlmforge.config.train import TrainConfig
from vlmforge.data.preference.loader import build_preference_loader
from vlmforge.data.pretrain.loader import build_pretrain_loader
from vlmforge.data.sft.loader import build_sft_loader
from vlmforge.data.sft.records import SFTDataError
from vlmforge.data.sft.verdicts import verdict_ids
from vlmforge.errors import ConfigError, UserError
from vlmforge.model.build import build_vlm
from vlmforge.model.saving import load_vlm, save_vlm
from vlmforge.text.tokenization import load_tokenizer, looks_local, tokenizer_fingerprint
from vlmforge.train.checkpoint import full_model_state
from vlmforge.train.loop import grad_accum_steps
from vlmforge.train.objectives import MPOObjective, VerdictObjective
from vlmforge.train.reference import checkpoint_fingerprint

ARCH_KEYS = (
    ("vision", "preset"),
    ("vision", "pretrained"),
    ("vision", "feature_layer"),
    ("llm", "preset"),
    ("llm", "pretrained"),
    ("projector", "kind"),
    ("projector", "hidden_size"),
)


def resolve_init_from(path: str) -> Path:
    """A vlmforge checkpoint folder, or a run folder whose final/ is one."""
    p = Path(path)
    for cand in (p, p / "final"):
        if (cand / "model.safetensors").is_file() and (cand / "config.yaml").is_file():
            return cand
    if not p.exists():
        raise ConfigError(f"train.init_from: {path} does not exist")
    raise ConfigError(
        f"train.init_from: {path} is not a vlmforge checkpoint (model.safetensors + config.yaml) "
        "nor a run folder with a final/ checkpoint"
    )


def settle_objective(cfg: Recipe) -> None:
    """train.objective follows the stage: stage mpo trains the mpo objective (set here), the other
    stages next-token prediction (train.objective=mpo elsewhere is refused)."""
    t = cfg.train
    if t.stage == "mpo":
        t.objective = "mpo"
    elif t.objective == "mpo":
        raise ConfigError(f"train.objective=mpo trains on preference pairs: set train.stage=mpo (now {t.stage})")


def validate(cfg: Recipe, world_size: int) -> None:
    """Fail fast, with the offending key in the message, before any heavy work (also settles
    train.objective, see :func:`settle_objective`)."""
    settle_objective(cfg)
    t = cfg.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no GPU is visible")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of train.micro_batch_size x "
            f"processes = {t.micro_batch_size} x {world_size}"
        )
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError("set train.max_steps > 0 or train.epochs > 0")
    # The data keys are checked even when train.init_from is wrong too: a run pointed at the wrong
    # data hears about that key, not only about the recipe's checkpoint.
    init_problem = None
    if t.init_from:
        try:
            resolve_init_from(t.init_from)
        except ConfigError as e:
            init_problem = e
    try:
        _validate_data(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e}; also {init_problem}" if init_problem else str(e)) from None
    if init_problem:
        raise init_problem
    if t.stage == "prm" and cfg.sft.batching == "pack" and cfg.model.attention != "document":
        raise ConfigError("train.stage=prm with sft.batching=pack needs model.attention=document: the critic is "
                          "scored one conversation per row, so it must not see other conversations in training "
                          f"(model.attention is {cfg.model.attention}; or use sft.batching=length_group)")
    images = cfg.model.images
    if t.stage == "mpo" and (images.tiles or images.start or images.end):
        raise ConfigError("model.images: stage mpo trains preference pairs at one tile per image without a wrap (its "
                          "loader expands each <image> to the tokens of one tile); set model.images.tiles=false and "
                          "leave model.images.start/end unset")
    if t.stage == "mpo" and t.balance_ranks:
        raise ConfigError("train.balance_ranks: stage mpo deals pairs round-robin (its micro-batches share a prompt "
                          "per pair); set train.balance_ranks=false")
    if t.stage == "mpo" and not t.init_from:
        raise ConfigError("train.init_from: MPO starts from an SFT checkpoint; set it to a run folder or checkpoint "
                          "folder (the initial model is also the reference)")
    tok = stage_tokenizer(cfg)
    if tok and not t.init_from and looks_local(tok, bare_name_is_local=True) and not Path(tok).exists():
        raise ConfigError(f"tokenizer.path: {tok} does not exist")


def _validate_data(cfg: Recipe) -> None:
    """The stage's data keys: train.data_path (pretraining), sft.index / sft.image_root (SFT) or
    preference.index / preference.image_root (MPO)."""
    t = cfg.train
    if t.stage == "pretrain":
        if not t.data_path:
            raise ConfigError("train.data_path: set it to the packed shards folder from `vlmforge pack`")
        if not Path(t.data_path).exists():
            raise ConfigError(f"train.data_path: {t.data_path} does not exist")
        if not t.init_from and not stage_tokenizer(cfg):
            raise ConfigError("tokenizer.path: pretraining from scratch needs the tokenizer the shards were packed with")
        return
    ix = _INDEXES[t.stage]
    section, label, command = ix.section, ix.label, ix.command
    if t.data_path:
        raise ConfigError(f"train.data_path={t.data_path} is pretraining's packed data; {ix.stage_label} reads "
                          f"its {ix.reads} from {section}.index (and its images from {section}.image_root)")
    index = cfg[section].index
    if not index:
        raise ConfigError(f"{section}.index: set it to a {label} index folder from `vlmforge {command}`")
    if not Path(index).exists():
        raise ConfigError(f"{section}.index: {index} does not exist; build it with `vlmforge {command} --out {index}`")
    if not Path(index, "manifest.json").is_file():
        raise ConfigError(f"{section}.index: {index} is not a {label} index folder (no manifest.json)")
    stage = _manifest_stage(Path(index, "manifest.json"))
    if stage != ix.manifest_stage:
        raise ConfigError(f"{section}.index: {index} holds a {stage!r} folder, not a {label} index from "
                          f"`vlmforge {command}`")
    root = cfg[section].image_root
    if root and not Path(root).is_dir():
        raise ConfigError(f"{section}.image_root: {root} is not a folder")


@dataclass(frozen=True)
class _Index:
    """The index a stage reads: its recipe section, what it is called, the command that writes it
    and the stage its manifest names."""

    section: str
    label: str
    command: str
    manifest_stage: str
    stage_label: str
    reads: str  # what the stage reads from it


_INDEXES = {
    "sft": _Index("sft", "SFT", "sft-index", "sft-index", "SFT", "index"),
    "mpo": _Index("preference", "preference", "preference index", "preference-index", "MPO", "pairs"),
    "prm": _Index("sft", "SFT", "sft-index", "sft-index", "PRM training", "step-labelled conversations"),
}
# Records of an index checked before a PRM run starts: if none is a critic conversation, the index
# is other SFT data (a run would skip every record).
PRM_PROBE_RECORDS = 16


def _manifest_stage(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def stage_tokenizer(cfg: Recipe) -> str | None:
    """tokenizer.path; in pretraining without it, the tokenizer the packed data was made with
    (its manifest records it)."""
    if cfg.tokenizer.path:
        return str(cfg.tokenizer.path)
    if cfg.train.stage != "pretrain" or not cfg.train.data_path:
        return None
    manifest = Path(cfg.train.data_path, "manifest.json")
    if not manifest.is_file():
        return None
    try:
        m = json.loads(manifest.read_text())
        return m.get("geometry", {}).get("tokenizer") or m.get("tokenizer")
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- one tokenizer per pipeline, run fingerprints

_WARNED_UNRECORDED: set[str] = set()  # data folders already warned about (once per process)


def data_folder(cfg: Recipe) -> Path:
    """The stage's data folder: packed shards (train.data_path), the SFT index (sft.index) or the
    preference index (preference.index)."""
    stage = cfg.train.stage
    if stage in _INDEXES:
        return Path(cfg[_INDEXES[stage].section].index)
    return Path(cfg.train.data_path)


def data_fingerprint(folder: Path) -> str:
    """sha256 of the data folder's manifest.json and the names and sizes of its data files: a
    re-pack or re-index changes it, moving the folder does not."""
    h = hashlib.sha256()
    files = sorted(p for pat in ("*.tar", "*.index.json", "*.npy") for p in folder.glob(pat) if p.is_file())
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
    manifest = folder / "manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    return h.hexdigest()


def _tokenizer_label(path: Any, fp: dict) -> str:
    return f"{path} (sha256 {fp['sha256'][:12]}, {fp['len']} tokens)"


def _fingerprint_of(path: str, key: str, trust_remote_code: bool) -> dict:
    try:
        return tokenizer_fingerprint(load_tokenizer(path, trust_remote_code=trust_remote_code))
    except ValueError as e:  # load_tokenizer's "cannot load tokenizer from ..."
        raise UserError(f"{key}: {e}") from None


def run_tokenizer(cfg: Recipe) -> tuple[str, dict]:
    """(path, fingerprint) of the tokenizer this run trains with: train.init_from's tokenizer/ folder,
    else tokenizer.path (or the one the packed data records). With both train.init_from and a local
    tokenizer.path, the two must be the same tokenizer (the checkpoint's embeddings belong to its own)."""
    t = cfg.train
    if t.init_from:
        ckpt = resolve_init_from(t.init_from)
        path = str(ckpt / "tokenizer")
        fp = _fingerprint_of(path, "train.init_from", bool(cfg.model.trust_remote_code))
        conf = cfg.tokenizer.path
        if conf and Path(str(conf)).exists():  # a hub id is not looked up: the checkpoint's tokenizer is used
            cfp = _fingerprint_of(str(conf), "tokenizer.path", bool(cfg.tokenizer.trust_remote_code))
            if cfp["sha256"] != fp["sha256"]:
                raise UserError(
                    f"tokenizer.path {_tokenizer_label(conf, cfp)} is not the tokenizer of train.init_from "
                    f"{_tokenizer_label(path, fp)}: set tokenizer.path to the checkpoint's tokenizer (or leave it "
                    "unset), or start from a checkpoint trained with this tokenizer"
                )
        return path, fp
    path = stage_tokenizer(cfg)
    if not path:
        raise ConfigError("tokenizer.path: set it (or train.init_from) to train from scratch")
    return path, _fingerprint_of(path, "tokenizer.path", bool(cfg.tokenizer.trust_remote_code))


def check_data_tokenizer(cfg: Recipe, tok_path: str, fp: dict) -> None:
    """Refuse data made with another tokenizer (pack and sft-index record theirs); an older data
    folder without a fingerprint is trained on after one warning."""
    folder = data_folder(cfg)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    pretrain = cfg.train.stage not in _INDEXES
    recorded = manifest.get("geometry", {}) if pretrain else manifest
    command = "pack" if pretrain else _INDEXES[cfg.train.stage].command
    if "tokenizer_fingerprint" not in recorded:
        if str(folder) not in _WARNED_UNRECORDED:
            _WARNED_UNRECORDED.add(str(folder))
            warnings.warn(
                f"{folder} records no tokenizer fingerprint (an older `vlmforge {command}` wrote it): cannot check "
                f"that it was made with {_tokenizer_label(tok_path, fp)}; re-run `vlmforge {command}` to record one",
                stacklevel=2,
            )
        return
    theirs = recorded["tokenizer_fingerprint"]
    if theirs is None:  # sft-index with estimated lengths and no tokenizer: no token ids in the index
        return
    if theirs.get("sha256") != fp["sha256"]:
        raise UserError(
            f"{folder} was made with tokenizer {_tokenizer_label(recorded.get('tokenizer'), theirs)} but this run "
            f"trains with {_tokenizer_label(tok_path, fp)}: re-run `vlmforge {command}` with --tokenizer {tok_path}, "
            f"or train with the tokenizer the data was made with"
        )


def run_fingerprints(cfg: Recipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check that data, checkpoint and tokenizer belong together (UserError naming both sides if
    not); returns (fingerprints that define the run, for run.json; paths, for information)."""
    tok_path, fp = run_tokenizer(cfg)
    check_data_tokenizer(cfg, tok_path, fp)
    folder = data_folder(cfg)
    init = str(resolve_init_from(cfg.train.init_from).resolve()) if cfg.train.init_from else None
    fingerprints = {"data.fingerprint": data_fingerprint(folder), "tokenizer.sha256": fp["sha256"], "train.init_from": init}
    return fingerprints, {"data": os.path.abspath(folder), "tokenizer": tok_path}


@dataclass
class StagePieces:
    model: Any
    tokenizer: Any
    loader: Any
    total_steps: int
    info: dict  # for the run manifest
    objective: Any = None  # None: the loop's next-token objective


def _check_same_architecture(cfg: Recipe, ckpt_cfg: Recipe, ckpt_dir: Path) -> None:
    for part, key in ARCH_KEYS:
        a, b = cfg.model[part][key], ckpt_cfg.model[part][key]
        if a != b:
            raise ConfigError(
                f"model.{part}.{key}={a!r} differs from the checkpoint's {b!r} ({ckpt_dir}/config.yaml); "
                "a stage can change run settings (pool_size, freezing, attention) but not the architecture"
            )


def build_model(cfg: Recipe, seed: int):
    """(model, tokenizer): loaded from train.init_from, or built from the recipe's model section.
    The recipe's run settings (freeze flags, pool size, attention/positions) apply either way (the
    loss settings, train.loss_chunk_tokens / fused_loss, when the trainer places the model)."""
    t = cfg.train
    if t.init_from:
        ckpt = resolve_init_from(t.init_from)
        model, tok, ckpt_cfg = load_vlm(ckpt)
        _check_same_architecture(cfg, ckpt_cfg, ckpt)
        model.apply_run_settings(cfg.model)  # this stage's pool size, freezing, attention, positions
    else:
        path = stage_tokenizer(cfg)
        if not path:
            raise ConfigError("tokenizer.path: set it (or train.init_from) to train from scratch")
        tok = load_tokenizer(path, trust_remote_code=bool(cfg.tokenizer.trust_remote_code))
        model = build_vlm(cfg.model, tok, seed=seed)
    return model, tok


def _steps(tcfg: TrainConfig, micro_batches_per_epoch: int, accum: int) -> int:
    if tcfg.max_steps > 0:
        return int(tcfg.max_steps)
    steps = int(math.floor(tcfg.epochs * micro_batches_per_epoch / accum))
    if steps < 1:
        raise ConfigError(
            f"the data gives {micro_batches_per_epoch} micro-batches per rank per epoch, fewer than one optimizer "
            f"step ({accum} micro-batches); lower train.global_batch_size or set train.max_steps"
        )
    return steps


def preference_layout(cfg: Recipe, model) -> str:
    """preference.layout, with auto resolved: the shared-prompt layout needs an explicit attention
    mask (its rejected response must not see the chosen one) and positions the data sets (rejected's
    continue from the prompt's end), so flash-attn varlen, V2PE and ``continue`` positions get the
    duplicated rows."""
    layout = str(cfg.preference.layout)
    if layout != "auto":
        return layout
    return "duplicated" if model.use_flash or str(cfg.model.positions) != "restart" else "shared"


def reference_key(cfg: Recipe, model) -> dict[str, Any]:
    """What MPO's precomputed reference log-probs depend on: the preference data, the initial
    checkpoint and the run settings that change a log-prob (see vlmforge.train.reference)."""
    index = Path(cfg.preference.index)
    init = resolve_init_from(cfg.train.init_from)
    return {
        "data": {"path": os.path.abspath(index), "fingerprint": data_fingerprint(index)},
        "init": {"path": str(init.resolve()), "fingerprint": checkpoint_fingerprint(init)},
        "model": {"tokens_per_image": int(model.tokens_per_image), "positions": str(model.positions),
                  "attention": str(model.attention), "v2pe_delta": float(model.v2pe_delta),
                  "preprocess": model.preprocess_spec()},
        # which pairs are valid (a pair longer than max_len is left out)
        "max_len": int(cfg.preference.max_len),
    }


def _preference_loader(cfg: Recipe, tok, model, micro: int, seed: int, rank: int, world: int):
    return build_preference_loader(
        cfg, tok, batch_size=micro, seed=seed, rank=rank, world_size=world,
        visual_tokens=int(model.tokens_per_image), image_spec=model.preprocess_spec(),
        layout=preference_layout(cfg, model),
    )


def build_stage(cfg: Recipe, rank: int, world: int) -> StagePieces:
    settle_objective(cfg)
    seed = run_seed(cfg)
    model, tok = build_model(cfg, seed)
    accum = grad_accum_steps(cfg.train, world)
    micro = int(cfg.train.micro_batch_size)  # rows (pretrain, SFT) or pairs (MPO) per forward pass per rank
    objective = None
    verdicts = verdict_ids(tok) if cfg.train.stage == "prm" else None
    if cfg.train.stage in ("sft", "prm"):
        loader = build_sft_loader(cfg, tok, batch_size=micro, seed=seed, rank=rank, world_size=world, verdicts=verdicts,
                                  balance_micro_steps=accum if cfg.train.balance_ranks else None)
        per_epoch = loader.batches_per_epoch(0)
        data = cfg.sft.index
        if verdicts is not None:
            check_prm_records(loader.ds, str(cfg.sft.index))
            objective = VerdictObjective(str(cfg.train.loss_reduction), *verdicts)
    elif cfg.train.stage == "mpo":
        loader = _preference_loader(cfg, tok, model, micro, seed, rank, world)
        per_epoch = loader.batches_per_epoch(0)
        data = cfg.preference.index
        if loader.num_pairs < world:
            raise ConfigError(f"preference.index {cfg.preference.index} has {loader.num_pairs} usable pair(s), fewer than "
                              f"the {world} processes: every rank needs at least one")
        objective = MPOObjective(cfg.mpo, loader=loader, reference_key=reference_key(cfg, model),
                                 v2pe_delta=float(cfg.model.v2pe_delta), reference_batch_size=micro,
                                 progress=bool(cfg.train.progress_bar))
    else:
        loader = build_pretrain_loader(cfg, tokenizer=tok, batch_size=micro, seed=seed, rank=rank, world_size=world,
                                       balance_micro_steps=accum if cfg.train.balance_ranks else None)
        per_epoch = len(loader)
        data = cfg.train.data_path
    total = _steps(cfg.train, per_epoch, accum)
    info = {
        "data": os.path.abspath(data),
        "init_from": str(resolve_init_from(cfg.train.init_from).resolve()) if cfg.train.init_from else None,
        "micro_batches_per_epoch_per_rank": int(per_epoch),
        "grad_accum_steps": accum,
        "world_size": world,
        "total_steps": total,
        "visual_tokens_per_image": int(model.tokens_per_image),
    }
    if verdicts is not None:
        info.update(objective="next_token", supervised="verdicts", verdict_ids={"+": verdicts[0], "-": verdicts[1]})
    if cfg.train.stage == "mpo":
        info.update(objective="mpo", preference_layout=preference_layout(cfg, model), reference=str(cfg.mpo.reference),
                    pairs=int(loader.num_pairs))
    return StagePieces(model=model, tokenizer=tok, loader=loader, total_steps=total, info=info, objective=objective)


def check_prm_records(dataset, index: str) -> None:
    """Refuse an index none of whose first records is a critic conversation (every assistant turn
    one '+' or '-'), naming the first record and what it replies; single bad records are skipped and
    counted (``bad_verdict``) by the loader, or stop the run with sft.strict."""
    first = None
    for i in range(min(len(dataset), PRM_PROBE_RECORDS)):
        try:
            dataset.tokens(i)
            return
        except SFTDataError as e:
            if e.reason != "bad_verdict":
                return  # another problem of that record: the loader counts it
            first = first or e
    if first is not None:
        raise ConfigError(f"sft.index {index} does not hold critic conversations: {first} (train.stage=prm learns "
                          "'+' / '-' replies, e.g. `vlmforge prm-data`'s prm.json indexed with `vlmforge sft-index`)")


def export_final(model, tokenizer, cfg: Recipe, out_dir: Path) -> None:
    """Collective: unsharded fp32 weights -> a vlmforge checkpoint folder (rank 0 writes)."""
    if vdist.world_size() == 1:
        save_vlm(model, tokenizer, cfg, out_dir)
        return
    state = full_model_state(model)  # only rank 0 holds the tensors
    if vdist.is_main():
        arch = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with tempfile.TemporaryDirectory() as tmp:  # the live model's exact architectures, no download
            for part, sub in (("vision", model.vision), ("llm", model.llm)):
                path = Path(tmp, f"{part}.json")
                sub.config.to_json_file(str(path))
                arch.model[part].preset, arch.model[part].pretrained = str(path), None
            with no_init_weights():
                plain = build_vlm(arch.model, tokenizer, resize_vocab=False)
        plain.load_state_dict(state, strict=True)
        plain.apply_run_settings(cfg.model)
        save_vlm(plain, tokenizer, cfg, out_dir)
    vdist.barrier()
