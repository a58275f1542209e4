"""What each `vlmforge demo --size` runs: every setting lives in the recipes under recipes/demo/,
one folder per size (``<size>/world.yaml``, ``<size>/pretrain.yaml``, ``<size>/sft.yaml``,
``<size>/mpo.yaml``, ``<size>/prm.yaml``); this
module only finds a size's folder and reads the values the pipeline passes to its commands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlmforge.config.loader import BUILTIN_DIR, load_recipe, load_recipe_files
from vlmforge.errors import ConfigError

DEMO_DIR = BUILTIN_DIR / "demo"
SIZES = sorted(p.parent.name for p in DEMO_DIR.glob("*/world.yaml"))
STAGES = ("world", "pretrain", "sft", "mpo", "prm")  # the recipe files of a size folder


@dataclass(frozen=True)
class DemoPreset:
    """A size's settings as its recipe files write them (so each command line reads as the file does)."""

    size: str
    synth: list[tuple[str, Any]]  # (synth.KEY, value) for `vlmforge synth --set`, in the files' order
    vision_epochs: Any  # vision_pretrain.epochs
    filter_epochs: Any  # curate.train_filter.epochs
    eval_limit: Any  # eval.limit: questions per benchmark, None = all
    pretrain_epochs: Any  # <size>/pretrain.yaml train.epochs
    sft_epochs: Any  # <size>/sft.yaml train.epochs
    mpo_recipe: str  # <size>/mpo.yaml, the MPO stage's recipe as it is (batch sizes differ by size)
    prm_recipe: str  # <size>/prm.yaml, the process reward model's recipe


def _flat(section: DictConfig, prefix: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in section.items():
        if isinstance(value, DictConfig):
            out += _flat(value, f"{prefix}.{key}")
        else:
            out.append((f"{prefix}.{key}", value))
    return out


def _required(files: DictConfig, key: str, recipe: str) -> Any:
    value = OmegaConf.select(files, key)
    if value is None:
        raise ConfigError(f"{recipe}: {key} is not set (the demo reads it from there)")
    return value


def load_preset(size: str) -> DemoPreset:
    """Size ``size``'s settings; every file is validated against the schema first (before any work)."""
    if size not in SIZES:
        raise ConfigError(f"demo size {size!r} does not exist (sizes: {', '.join(SIZES)}; folders of {DEMO_DIR})")
    names = {stage: f"demo/{size}/{stage}" for stage in STAGES}
    for name in names.values():
        load_recipe(name)
    files = {stage: load_recipe_files(name) for stage, name in names.items()}
    world = files["world"]
    return DemoPreset(
        size=size,
        synth=_flat(world.synth, "synth"),
        vision_epochs=_required(world, "vision_pretrain.epochs", names["world"]),
        filter_epochs=_required(world, "curate.train_filter.epochs", names["world"]),
        eval_limit=OmegaConf.select(world, "eval.limit"),
        pretrain_epochs=_required(files["pretrain"], "train.epochs", names["pretrain"]),
        sft_epochs=_required(files["sft"], "train.epochs", names["sft"]),
        mpo_recipe=names["mpo"],
        prm_recipe=names["prm"],
    )


def shared_sft_settings() -> tuple[dict, dict]:
    """The demo's SFT data settings and turn weights, as recipes/demo/world.yaml sets them for every size."""
    synth = load_recipe_files(DEMO_DIR / "world.yaml").synth
    data = {k: v for k, v in synth.items() if k.startswith("sft_") and k != "sft_turn_weights"}
    return data, dict(synth.sft_turn_weights)
