"""`vlmforge train --recipe tiny/mpo` end to end on a real preference index (`vlmforge preference
index`) from a tiny SFT-like checkpoint; and the MPO stage's recipe checks, before any work."""

import json

import pytest
from fixtures_model import tiny_checkpoint
from fixtures_train import COLOURS, one_torch_thread, square_png

from vlmforge.cli import main
from vlmforge.files import read_metrics

FAST = ["train.progress_bar=false", "train.tensorboard=false", "train.report=false", "model.projector.pool_size=2"]

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


def _sets(items):
    return sum((["--set", s] for s in items), [])


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpo_stage")
    ckpt, _, _ = tiny_checkpoint(root)
    images = root / "images"
    images.mkdir()
    rows = []
    names = sorted(COLOURS)
    for i in range(10):
        colour, wrong = names[i % 3], names[(i + 1) % 3]
        (images / f"{i}.png").write_bytes(square_png(colour))
        rows.append({"image": f"{i}.png", "question": "What colour is the square?",
                     "chosen": f"The square is {colour}.", "rejected": f"The square is {wrong}."})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["preference", "index", "--recipe", "tiny/mpo", "--input", str(root / "pairs.jsonl"),
                 "--image-root", str(images), "--tokenizer", str(ckpt / "tokenizer"), "--out", str(root / "index"),
                 *_sets(["model.projector.pool_size=2"])]) == 0
    return root, ckpt


def test_tiny_mpo_trains_from_a_checkpoint_on_a_real_index(pref, tmp_path):
    root, ckpt = pref
    run = tmp_path / "mpo"
    args = ["train", "--recipe", "tiny/mpo", *_sets([f"preference.index={root / 'index'}", f"train.init_from={ckpt}",
                                                     f"train.run_dir={run}", *FAST])]
    assert main(args) == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss/preference", "loss/quality", "loss/generation", "rewards/chosen", "rewards/rejected",
                "rewards/margin", "rewards/accuracy", "reward_shift"):
        assert key in rows[0], key
    assert rows[0]["pairs"] == 4
    assert abs(rows[0]["rewards/chosen"]) < 1e-5  # step 1: the policy is the reference
    assert (run / "reference" / "logps.safetensors").is_file() and (run / "final" / "model.safetensors").is_file()
    ref = json.loads((run / "reference" / "reference.json").read_text())
    assert ref["complete"] and ref["num_pairs"] == 10
    assert ref["key"]["data"]["path"] == str((root / "index").resolve())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["run"]["objective"] == "mpo" and manifest["run"]["preference_layout"] == "shared"
    assert manifest["counts"]["pairs"] == 16
    settings = json.loads((run / "run.json").read_text())["settings"]
    assert settings["train.objective"] == "mpo" and settings["mpo.beta"] == 0.1


@pytest.mark.parametrize("overrides, message", [
    (["train.init_from=null"], "train.init_from: MPO starts from an SFT checkpoint"),
    (["preference.index=null"], "preference.index: set it to a preference index folder"),
    (["preference.index=/nonexistent/idx"], "preference.index: /nonexistent/idx does not exist"),
    (["train.data_path=/some/packed"], "MPO reads its pairs from preference.index"),
])
def test_mpo_recipe_mistakes_fail_before_work(pref, tmp_path, capsys, overrides, message):
    root, ckpt = pref
    run = tmp_path / "never"
    base = [f"preference.index={root / 'index'}", f"train.init_from={ckpt}", f"train.run_dir={run}", *FAST]
    assert main(["train", "--recipe", "tiny/mpo", *_sets(base + overrides)]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_an_sft_index_is_not_a_preference_index(pref, tmp_path, capsys):
    root, ckpt = pref
    fake = tmp_path / "sft_index"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"stage": "sft-index"}))
    args = [f"preference.index={fake}", f"train.init_from={ckpt}", f"train.run_dir={tmp_path / 'x'}", *FAST]
    assert main(["train", "--recipe", "tiny/mpo", *_sets(args)]) == 2
    assert "holds a 'sft-index' folder, not a preference index" in capsys.readouterr().err


def test_objective_mpo_needs_stage_mpo(tmp_path, capsys):
    args = ["train.objective=mpo", "train.data_path=/x", f"train.run_dir={tmp_path / 'x'}"]
    assert main(["train", "--recipe", "tiny/pretrain", *_sets(args)]) == 2
    assert "train.objective=mpo trains on preference pairs: set train.stage=mpo" in capsys.readouterr().err


def test_an_index_made_with_another_tokenizer_is_refused(pref, tmp_path, capsys):
    from fixtures_tokenizer import shape_sentences

    from vlmforge.text.tokenization import train_tokenizer

    root, ckpt = pref
    train_tokenizer(shape_sentences(seed=1), tmp_path / "other_tok", vocab_size=400, min_frequency=2)
    assert main(["preference", "index", "--recipe", "tiny/mpo", "--input", str(root / "pairs.jsonl"),
                 "--image-root", str(root / "images"), "--tokenizer", str(tmp_path / "other_tok"),
                 "--out", str(tmp_path / "index"), *_sets(["model.projector.pool_size=2"])]) == 0
    capsys.readouterr()
    args = [f"preference.index={tmp_path / 'index'}", f"train.init_from={ckpt}", f"train.run_dir={tmp_path / 'x'}", *FAST]
    assert main(["train", "--recipe", "tiny/mpo", *_sets(args)]) == 2
    err = capsys.readouterr().err
    assert "was made with tokenizer" in err and "re-run `vlmforge preference index`" in err
