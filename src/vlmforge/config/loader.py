"""Load, merge, override and validate recipes.

A recipe file is a partial YAML view of :class:`~vlmforge.config.recipe.Recipe`; every
field it leaves out keeps its schema default. A recipe may name a ``base`` recipe
(path relative to itself, or a built-in name) that is merged first.
Validation is OmegaConf's: unknown keys, wrong types, values outside a choice field's
``Literal[...]`` and missing required values raise before any work starts, and we re-raise
them naming the key, the value, the allowed values and the file (or the ``--set`` overrides).
Numbers out of the range their schema field declares (``config.ranges``) are refused the same
way, after each merge step, naming the step (file or ``--set``) that brought them in.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlmforge.config.ranges import check_ranges
from vlmforge.config.recipe import Recipe
from vlmforge.errors import ConfigError

BUILTIN_DIR = Path(str(resources.files("vlmforge") / "recipes"))
# OmegaConf's message for a value outside a Literal[...] field.
_CHOICE_ERROR = re.compile(r"Invalid value (?P<value>.*), expected one of \[(?P<allowed>.*)\]$")
# Keys no longer in the schema: {key: (the value old resolved configs hold, where the setting went)}.
# Run folders and checkpoints written before their removal still load; any other value fails.
REMOVED_KEYS = {
    "train.image_root": (None, "SFT reads its images from sft.image_root"),
    "train.text_data_path": (None, "nothing read it; text-only data is mixed in at pack time (pack.text_corpus)"),
    "train.text_mix_ratio": (0.0, "nothing read it; text-only data is mixed in at pack time (pack.text_ratio)"),
    "sft.batch_size": (8, "SFT rows per batch per rank are train.micro_batch_size"),
}


def resolve_recipe_path(name_or_path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A file path (absolute, or relative to cwd / ``relative_to``) or a built-in name like ``tiny/pretrain``."""
    raw = str(name_or_path)
    candidates = [Path(raw)]
    if relative_to is not None:
        candidates.insert(0, relative_to / raw)
    stem = raw[:-5] if raw.endswith(".yaml") else raw
    candidates.append(BUILTIN_DIR / f"{stem}.yaml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = ", ".join(sorted(str(p.relative_to(BUILTIN_DIR))[:-5] for p in BUILTIN_DIR.rglob("*.yaml")))
    raise ConfigError(f"recipe {raw!r} not found (not a file; built-in recipes: {known})")


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    choice = _CHOICE_ERROR.match(msg)
    if choice:
        allowed = ", ".join(a.strip().strip("'\"") for a in choice["allowed"].split(","))
        return f"{key} must be one of {allowed}, got {choice['value']}"
    return f"key '{key}': {msg}"


def _drop_removed_keys(layer: DictConfig, source: str) -> None:
    for key, (old_default, where) in REMOVED_KEYS.items():
        section, name = key.split(".")
        sub = layer.get(section) if isinstance(layer, DictConfig) else None
        if not isinstance(sub, DictConfig) or name not in sub:
            continue
        if sub[name] != old_default:
            raise ConfigError(f"{source}: {key} is no longer a setting: {where}")
        del sub[name]


def _load_file_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    if path in seen:
        raise ConfigError(f"{path}: recipe base cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml parse errors carry line numbers
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping at the top level")
    chain: list[tuple[Path, DictConfig]] = []
    base = cfg.pop("base", None)
    if base:
        chain += _load_file_chain(resolve_recipe_path(base, relative_to=path.parent), seen + (path,))
    chain.append((path, cfg))
    return chain


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    _drop_removed_keys(layer, source)
    try:
        merged: DictConfig = OmegaConf.merge(base, layer)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None
    check_ranges(merged, source)
    return merged


def _check_complete(cfg: DictConfig, source: str) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: missing required value(s): {', '.join(missing)}")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None


def load_recipe_files(recipe: str | os.PathLike) -> DictConfig:
    """Only what a recipe's files write (base chain merged, base first; keys in the order they first
    appear; values as written, without schema defaults or validation). :func:`load_recipe` checks them."""
    cfg = OmegaConf.create({})
    for _, layer in _load_file_chain(resolve_recipe_path(recipe)):
        cfg = OmegaConf.merge(cfg, layer)
    return cfg


def load_recipe(
    recipe: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    require_complete: bool = True,
    schema: type = Recipe,
) -> DictConfig:
    """Schema defaults <- recipe chain (base first) <- ``--set key=value`` overrides."""
    cfg: DictConfig = OmegaConf.structured(schema)
    sources = ["defaults"]
    if recipe is not None:
        for path, layer in _load_file_chain(resolve_recipe_path(recipe)):
            cfg = _merge(cfg, layer, str(path))
            sources.append(str(path))
    overrides = list(overrides)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set {ov!r}: expected key=value")
    if overrides:
        try:
            layer = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as e:
            raise ConfigError(f"--set: {_describe(e)}") from None
        cfg = _merge(cfg, layer, "--set " + " ".join(overrides))
    if require_complete:
        _check_complete(cfg, sources[-1] if len(sources) > 1 else "recipe")
    OmegaConf.set_readonly(cfg, False)
    return cfg


def recipe_from_dict(data: dict, source: str = "<dict>") -> DictConfig:
    """Validate a plain dict (e.g. from a checkpoint's saved config) against the schema."""
    cfg = _merge(OmegaConf.structured(Recipe), OmegaConf.create(data), source)
    _check_complete(cfg, source)
    return cfg


def set_value(cfg: DictConfig, key: str, value: Any, source: str) -> None:
    """Set one field from a command-line flag; the schema validates it and the error names the flag."""
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None
    check_ranges(cfg, source)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_resolved(cfg: DictConfig, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved recipe into an output folder (every stage does this)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
    return path
