"""Recipes: schema validation, overrides, base chains, and error messages that name key and file."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from vlmforge.cli import main
from vlmforge.config import load_recipe, save_resolved
from vlmforge.config.loader import BUILTIN_DIR
from vlmforge.errors import ConfigError


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


def test_wrong_choice_names_key_value_allowed_values_and_source(tmp_path):
    r = write(tmp_path / "r.yaml", "model:\n  projector:\n    kind: linear\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(r)
    msg = str(e.value)
    assert str(r) in msg and "model.projector.kind" in msg and "'linear'" in msg
    assert "avgpool_mlp, pixel_shuffle_mlp, mlp" in msg
    with pytest.raises(ConfigError) as e:
        load_recipe("tiny/pretrain", ["train.lr_schedule=step"])
    msg = str(e.value)
    assert "--set train.lr_schedule=step" in msg and "'step'" in msg and "cosine, linear, constant" in msg
    with pytest.raises(ConfigError, match=r"curate.dedup.exact\[1\] must be one of uid, image, caption, pair"):
        load_recipe(None, ["curate.dedup.exact=[uid,bytes]"])
    assert load_recipe(None, ["train.lr_schedule=linear"]).train.lr_schedule == "linear"  # a plain str


def test_removed_key_says_where_the_setting_went(tmp_path):
    r = write(tmp_path / "r.yaml", "train:\n  image_root: /data/images\n")
    with pytest.raises(ConfigError, match="train.image_root .*sft.image_root") as e:
        load_recipe(r)
    assert str(r) in str(e.value)
    # run folders written before the key went away still load
    old = write(tmp_path / "old.yaml", "train:\n  image_root: null\n  text_mix_ratio: 0.0\n")
    assert "image_root" not in load_recipe(old).train


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


def test_min_tiles_above_max_tiles_names_both_keys_and_the_source(tmp_path, capsys):
    r = write(tmp_path / "r.yaml", "model:\n  images:\n    tiles: true\n    min_tiles: 6\n    max_tiles: 4\n")
    both = r"model\.images\.min_tiles \(6\) must be <= model\.images\.max_tiles \(4\)"
    with pytest.raises(ConfigError, match=rf"{r}: {both}"):
        load_recipe(r)
    six = write(tmp_path / "six.yaml", "model:\n  images:\n    min_tiles: 6\n")
    assert load_recipe(six).model.images.max_tiles == 12
    with pytest.raises(ConfigError, match=rf"^--set model.images.max_tiles=4: {both}$"):  # the step that broke it
        load_recipe(six, ["model.images.max_tiles=4"])
    with pytest.raises(ConfigError, match=both):  # tiles off too: the recipe is wrong either way
        load_recipe(None, ["model.images.min_tiles=6", "model.images.max_tiles=4"])
    assert load_recipe(None, ["model.images.min_tiles=4", "model.images.max_tiles=4"]).model.images.min_tiles == 4
    assert main(["model-info", "--set", "model.images.min_tiles=13"]) == 2
    err = capsys.readouterr().err
    assert "model.images.min_tiles (13) must be <= model.images.max_tiles (12)" in err and len(err.splitlines()) == 1


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
