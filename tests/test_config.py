"""Recipes: schema validation, overrides, base chains, and error messages that name key and file."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from vlmforge.cli import main
from vlmforge.config import load_recipe, save_resolved
from vlmforge.errors import ConfigError
from vlmforge.config.loader import BUILTIN_DIR


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_validate_without_a_file():
    cfg = load_recipe(None)
    assert cfg.seed == 0 and cfg.model.projector.kind == "avgpool_mlp"


def test_unknown_key_names_key_and_file(tmp_path):
    r = write(tmp_path / "r.yaml", "synth:\n  image_sise: 32\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(r)
    assert "synth.image_sise" in str(e.value) and str(r) in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    r = write(tmp_path / "r.yaml", "seed: not-a-number\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(r)
    assert "'seed'" in str(e.value) and str(r) in str(e.value)


def test_override_converts_type_and_rejects_bad_values(tmp_path):
    cfg = load_recipe(None, ["synth.image_size=32", "model.projector.pool_size=12"])
    assert cfg.synth.image_size == 32 and cfg.model.projector.pool_size == 12
    with pytest.raises(ConfigError, match="synth.image_size"):
        load_recipe(None, ["synth.image_size=abc"])
    with pytest.raises(ConfigError, match="synth.nope"):
        load_recipe(None, ["synth.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(None, ["synth.image_size"])


@dataclass
class NeedsData:
    data: str = MISSING
    seed: int = 0


def test_missing_required_value_is_reported(tmp_path):
    r = write(tmp_path / "r.yaml", "seed: 3\n")
    with pytest.raises(ConfigError, match="missing required value.*data") as e:
        load_recipe(r, schema=NeedsData)
    assert str(r) in str(e.value)
    assert load_recipe(r, ["data=x"], schema=NeedsData).data == "x"


def test_base_chain_merges_in_order_and_detects_cycles(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\nsynth:\n  image_size: 32\n")
    b = write(tmp_path / "b.yaml", "base: a.yaml\nseed: 2\n")
    cfg = load_recipe(b, ["name=x"])
    assert (cfg.seed, cfg.synth.image_size, cfg.name) == (2, 32, "x")
    write(tmp_path / "c.yaml", "base: d.yaml\n")
    d = write(tmp_path / "d.yaml", "base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(d)


def test_unknown_recipe_lists_builtins():
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("no/such/recipe")


@pytest.mark.parametrize("path", sorted(BUILTIN_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(BUILTIN_DIR)))
def test_every_builtin_recipe_validates(path):
    load_recipe(path)


def test_save_resolved_round_trips(tmp_path):
    cfg = load_recipe(None, ["seed=7"])
    p = save_resolved(cfg, tmp_path / "out")
    again = load_recipe(p)
    assert OmegaConf.to_container(again, resolve=True) == OmegaConf.to_container(cfg, resolve=True)


def test_cli_reports_config_error_without_traceback(tmp_path, capsys):
    r = write(tmp_path / "r.yaml", "bogus: 1\n")
    assert main(["recipes", str(r)]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and str(r) in err and "Traceback" not in err
