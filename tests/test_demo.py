"""`vlmforge demo --size tiny`: the whole pipeline end to end, in-process, as CI runs it."""

import json

import pytest

from vlmforge.cli import main

# after SFT at the tiny size, seed 0 (measured: see docs/experiments.md); chance is ~0 for both
VQA_FLOOR = 0.2
MATH_FLOOR = 0.1


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    # overrides: one for every stage, one per training stage (checked below)
    assert main(["demo", "--size", "tiny", "--out", str(out), "--threads", "1", "--set", "synth.num_text=250",
                 "--pretrain-set", "train.lr=0.0015", "--sft-set", "train.lr=0.0025", "--mpo-set", "mpo.beta=0.2"]) == 0
    return out


def test_every_stage_wrote_its_folder_config_and_manifest(demo_dir):
    for stage in ("world", "vision", "curate/filter", "curate/scores", "curate/filtered", "curate/curated", "packed",
                  "sft_index", "runs/pretrain", "runs/sft", "eval/init", "eval/pretrain", "eval/sft",
                  "preference/pairs", "preference/index", "runs/mpo", "eval/mpo", "prm/data", "prm/index", "runs/prm",
                  "eval/best_of_n", "eval/prm_steps"):
        folder = demo_dir / stage
        assert folder.is_dir(), stage
    for stage in ("world", "vision", "curate/filtered", "curate/curated", "packed", "sft_index", "runs/pretrain", "runs/sft",
                  "eval/sft", "preference/index", "runs/mpo", "eval/mpo"):
        assert (demo_dir / stage / "manifest.json").is_file(), stage
        assert (demo_dir / stage / "config.yaml").is_file(), stage
    # preference build takes no recipe: its settings are in inputs.json next to its manifest
    assert (demo_dir / "preference" / "pairs" / "manifest.json").is_file()


def test_report_shows_every_benchmark_at_every_phase_next_to_chance(demo_dir):
    summary = json.loads((demo_dir / "demo_summary.json").read_text())
    rows = summary["scores"]
    assert {r["benchmark"] for r in rows} == {"synth-mcq", "synth-mcq@likelihood", "synth-vqa", "synth-pope", "synth-math"}
    for r in rows:
        assert r["chance"] is not None
        # the reasoning task is asked once the model has been taught to reason in steps
        phases = ("after SFT", "after MPO") if r["benchmark"] == "synth-math" else (
            "before training", "after pretraining", "after SFT", "after MPO")
        for phase in phases:
            assert isinstance(r[phase], float) and 0.0 <= r[phase] <= 1.0
    html = (demo_dir / "report.html").read_text()
    assert "after SFT" in html and "after MPO" in html and "chance" in html and "plots/scores.png" in html
    assert (demo_dir / "plots" / "scores.png").stat().st_size > 1000
    assert (demo_dir / "runs" / "sft" / "plots" / "loss.png").is_file()
    # the report says what was trained, so a reader knows the vision tower's status
    assert "Vision tower: pretrained by `vlmforge vision-pretrain`" in html and "frozen in the VLM" in html
    # ... and how: the demo recipes train with Muon, at the SFT override's AdamW lr
    assert "pretraining Muon (lr 0.02)" in html and "SFT Muon (lr 0.005) on weight matrices, AdamW (lr 0.0025)" in html


def test_the_vlm_sees_through_the_pretrained_frozen_tower(demo_dir):
    from omegaconf import OmegaConf

    for stage in ("pretrain", "sft"):
        cfg = OmegaConf.load(demo_dir / "runs" / stage / "config.yaml")
        assert cfg.model.vision.pretrained == str(demo_dir / "vision") and cfg.model.vision.frozen
    assert "--data" in next(r["command"] for r in json.loads((demo_dir / "demo_summary.json").read_text())["stages"]
                            if r["stage"] == "vision-pretrain")


def test_sft_started_from_the_pretrained_weights(demo_dir):
    manifest = json.loads((demo_dir / "runs" / "sft" / "manifest.json").read_text())
    assert manifest["inputs"]["init_from"].endswith("pretrain/final")


def test_overrides_reach_their_stages(demo_dir):
    from omegaconf import OmegaConf

    assert OmegaConf.load(demo_dir / "world" / "config.yaml").synth.num_text == 250
    assert len((demo_dir / "world" / "text" / "corpus.txt").read_text().splitlines()) == 250
    assert OmegaConf.load(demo_dir / "runs" / "pretrain" / "config.yaml").train.lr == 0.0015
    sft = OmegaConf.load(demo_dir / "runs" / "sft" / "config.yaml")
    assert sft.train.lr == 0.0025 and sft.synth.num_text == 250
    mpo = OmegaConf.load(demo_dir / "runs" / "mpo" / "config.yaml")
    assert mpo.mpo.beta == 0.2 and sft.mpo.beta == 0.1 and mpo.train.stage == "mpo"
    # MPO starts from the SFT run, on pairs the SFT model made from training-split questions
    assert json.loads((demo_dir / "runs" / "mpo" / "manifest.json").read_text())["inputs"]["init_from"].endswith("sft/final")
    pairs = json.loads((demo_dir / "preference" / "pairs" / "manifest.json").read_text())
    assert all("/questions/" in i["path"] for i in pairs["inputs"])


def test_demo_refuses_to_overwrite_without_flag(demo_dir, capsys):
    assert main(["demo", "--size", "tiny", "--out", str(demo_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_the_world_gets_the_demos_sft_mix(demo_dir):
    """The demo's SFT data settings reach synth (they once sat unused in the pipeline module)."""
    from omegaconf import OmegaConf

    from vlmforge.demo.presets import shared_sft_settings

    DEMO_SFT_DATA, DEMO_TURN_WEIGHTS = shared_sft_settings()

    synth = OmegaConf.load(demo_dir / "world" / "config.yaml").synth
    assert dict(synth.sft_turn_weights) == pytest.approx(DEMO_TURN_WEIGHTS)
    assert {k: synth[k] for k in DEMO_SFT_DATA} == DEMO_SFT_DATA
    records = json.loads((demo_dir / "world" / "sft" / "llava.json").read_text())
    assert all(len(r["conversations"]) >= 4 for r in records)  # every image gets 2+ questions


def _scores(demo_dir, phase: str) -> dict:
    tasks = json.loads((demo_dir / "eval" / phase / "results.json").read_text())["tasks"]
    return {name: task["metrics"][task["primary"]] for name, task in tasks.items()}


def test_sft_learns_clearly_above_chance(demo_dir):
    """The CI size must show learning, so that a change that breaks it fails here: after SFT, open
    VQA and the step-by-step reasoning task (chance ~0 for both: an exact word or number) are well
    above what the untrained model scores."""
    before, after = _scores(demo_dir, "init"), _scores(demo_dir, "sft")
    assert before["synth-vqa"] <= 0.05
    assert after["synth-vqa"] >= VQA_FLOOR, after
    assert after["synth-math"] >= MATH_FLOOR, after


def test_best_of_n_curve_from_the_critic(demo_dir):
    bon = json.loads((demo_dir / "eval" / "best_of_n" / "results.json").read_text())["tasks"]["synth-math"]["best_of_n"]
    assert bon["n"] == 8 and bon["ks"] == [1, 2, 4, 8] and bon["critic"]
    curves = bon["curves"]
    assert set(curves) == {"first", "majority", "orm", "prm", "pass"}
    # candidate 0 is the greedy reply, so every rule starts where greedy decoding is
    assert len({c[0] for c in curves.values()}) == 1
    assert curves["pass"] == sorted(curves["pass"]) and all(curves["pass"][-1] >= c[-1] for c in curves.values())
    assert (demo_dir / "plots" / "best_of_n.png").is_file() or "Best-of-N" in (demo_dir / "report.html").read_text()
