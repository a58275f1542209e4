"""`train.stage: prm`: critic conversations (critic_record rows indexed by `vlmforge sft-index`) with
the loss on the '+' / '-' verdict tokens only; a tiny run from a tiny checkpoint learns a trivial
label rule, and `vlmforge prm-score` reads it back; replies that are not one verdict are refused,
naming the record."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from fixtures_model import tiny_checkpoint
from fixtures_train import COLOURS, one_torch_thread, square_png

from vlmforge.arch.tokens import IM_END
from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.critic.steps import critic_record
from vlmforge.data.collate import IGNORE_INDEX
from vlmforge.data.sft.loader import build_sft_loader
from vlmforge.data.sft.records import SFTDataError
from vlmforge.data.sft.samples import SFTDataset
from vlmforge.data.sft.verdicts import verdict_ids
from vlmforge.files import read_metrics

FAST = ["train.progress_bar=false", "train.tensorboard=false", "train.report=false", "model.projector.pool_size=2"]
VT = 4  # visual tokens per image (pool 2 x 2)
QUESTION = "Is there a red square?"

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


def _sets(items):
    return sum((["--set", s] for s in items), [])


def solution(rng: random.Random) -> tuple[list[str], list[str]]:
    """1-4 steps; the rule to learn: a step "Yes." is right ('+'), a step "No." wrong ('-')."""
    steps = [rng.choice(["Yes.", "No."]) for _ in range(rng.randint(1, 4))]
    return steps, ["+" if s == "Yes." else "-" for s in steps]


def write_prm_json(path, n: int, seed: int, bad_reply: int | None = None) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        steps, labels = solution(rng)
        row = critic_record(f"s{seed}-{i}", f"{i % 3}.png", QUESTION, steps, labels)
        if i == bad_reply:
            row["conversations"][-1]["value"] = "yes"  # an assistant reply that is not a verdict
        rows.append(row)
    path.write_text(json.dumps(rows))
    return rows


def index(prm_json, images, tokenizer, out) -> None:
    assert main(["sft-index", "--recipe", "tiny/prm", "--input", str(prm_json), "--out", str(out),
                 "--image-root", str(images), "--tokenizer", str(tokenizer), "--set", "sft.index_workers=1"]) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prm_stage")
    ckpt, _, tok = tiny_checkpoint(root)
    images = root / "images"
    images.mkdir()
    for i, c in enumerate(sorted(COLOURS)):
        (images / f"{i}.png").write_bytes(square_png(c))
    rows = write_prm_json(root / "prm.json", 48, seed=0, bad_reply=5)
    index(root / "prm.json", images, ckpt / "tokenizer", root / "index")
    return root, ckpt, tok, images, rows


def test_only_the_verdict_tokens_are_supervised(data):
    root, ckpt, tok, images, rows = data
    plus, minus = verdict_ids(tok)
    sft = SFTDataset(root / "index", tok, visual_tokens=VT, image_root=images)
    prm = SFTDataset(root / "index", tok, visual_tokens=VT, image_root=images, verdicts=(plus, minus))
    end = tok.convert_tokens_to_ids(IM_END)
    for i in (0, 1, 2, 7):
        ids, labels, _ = prm.tokens(i)
        sft_ids, sft_labels, _ = sft.tokens(i)
        assert np.array_equal(ids, sft_ids)
        at = np.flatnonzero(labels != IGNORE_INDEX)
        want = [plus if x == "+" else minus for x in (t["value"] for t in rows[i]["conversations"] if t["from"] == "gpt")]
        assert labels[at].tolist() == want and ids[at].tolist() == want
        assert (ids[at + 1] == end).all()  # each verdict's <|im_end|> follows it, unsupervised
        # SFT supervises the same replies plus their <|im_end|>: nothing of the system/user turns or
        # the image tokens is supervised in either
        sft_at = np.flatnonzero(sft_labels != IGNORE_INDEX)
        assert sorted(np.concatenate([at, at + 1]).tolist()) == sft_at.tolist()
        assert (ids == 3).sum() == VT and not (labels[ids == 3] != IGNORE_INDEX).any()


def test_a_reply_that_is_not_a_verdict_names_its_record(data):
    root, ckpt, tok, images, rows = data
    prm = SFTDataset(root / "index", tok, visual_tokens=VT, image_root=images, verdicts=verdict_ids(tok))
    with pytest.raises(SFTDataError, match=r"prm\.json:\d+: assistant turn \d replies 'yes', not one '\+' or '-' token") as e:
        prm.tokens(5)
    assert e.value.reason == "bad_verdict"
    # a batch of the prm loader: every supervised label is a verdict, the bad record skipped and counted
    cfg = load_recipe("tiny/prm", [f"sft.index={root / 'index'}", f"sft.image_root={images}", "sft.batching=length_group",
                                   "sft.shuffle=false", "sft.drop_last=false", *FAST])
    loader = build_sft_loader(cfg, tok, batch_size=48, seed=0, rank=0, world_size=1, verdicts=verdict_ids(tok))
    batch = next(iter(loader))
    sup = batch["labels"][batch["labels"] != IGNORE_INDEX]
    assert set(sup.tolist()) <= set(verdict_ids(tok))
    assert sup.numel() == sum(len(r["conversations"]) // 2 for k, r in enumerate(rows) if k != 5)
    assert loader.skipped == {"bad_verdict": 1}


def test_tiny_prm_run_learns_the_verdict_rule(data, tmp_path, capsys):
    root, ckpt, tok, images, rows = data
    run = tmp_path / "prm"
    args = ["train", "--recipe", "tiny/prm", *_sets([
        f"sft.index={root / 'index'}", f"sft.image_root={images}", f"train.init_from={ckpt}", f"train.run_dir={run}",
        "sft.batching=length_group", "train.max_steps=45", *FAST,
        # a random LM: it first learns to answer '+' or '-' (loss near ln 2, accuracy at chance), then
        # to read the step; Muon at high rates gets there in these few steps
        "train.optimizer=muon", "train.muon_lr=0.05", "train.lr=1e-2", "train.warmup_steps=2",
        "train.lr_schedule=constant"])]
    assert main(args) == 0
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics] == list(range(1, 46))
    assert metrics[-1]["loss"] < 0.1 * metrics[0]["loss"] and metrics[-1]["loss"] < 0.05
    assert np.mean([r["verdict_accuracy"] for r in metrics[-5:]]) > 0.95
    assert (run / "final" / "model.safetensors").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert list(manifest["dropped"]) == ["bad_verdict"]  # counted each time an epoch meets it
    assert manifest["run"]["supervised"] == "verdicts" and manifest["run"]["verdict_ids"] == dict(zip("+-", verdict_ids(tok)))
    assert json.loads((run / "run.json").read_text())["settings"]["train.stage"] == "prm"

    # the final checkpoint is an ordinary critic: prm-score on new solutions reads the rule back
    rng = random.Random(1)
    held = []
    for i in range(12):
        steps, labels = solution(rng)
        held.append({"id": f"h{i}", "image": f"{i % 3}.png", "question": QUESTION, "steps": steps, "labels": labels})
    (images / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    capsys.readouterr()
    out = tmp_path / "scores.jsonl"
    assert main(["prm-score", "--critic", str(run), "--input", str(images / "held.jsonl"), "--out", str(out)]) == 0
    labels = json.loads((tmp_path / "scores.manifest.json").read_text())["labels"]
    assert labels["step_accuracy"] == 1.0 and labels["first_error_found"] == 1.0
    assert "step accuracy 1.000" in capsys.readouterr().out


def test_an_index_of_other_conversations_is_refused(data, tmp_path, capsys):
    root, ckpt, tok, images, rows = data
    other = [{"image": "0.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is the square?"},
                                                  {"from": "gpt", "value": "The square is black."}]}] * 4
    (tmp_path / "sft.json").write_text(json.dumps(other))
    index(tmp_path / "sft.json", images, ckpt / "tokenizer", tmp_path / "index")
    args = [f"sft.index={tmp_path / 'index'}", f"sft.image_root={images}", f"train.init_from={ckpt}",
            f"train.run_dir={tmp_path / 'run'}", *FAST]
    assert main(["train", "--recipe", "tiny/prm", *_sets(args)]) == 2
    err = capsys.readouterr().err
    assert "does not hold critic conversations" in err and "sft.json:" in err and "replies 'The square is black.'" in err


def test_strict_stops_at_the_bad_record(data, tmp_path, capsys):
    root, ckpt, tok, images, rows = data
    args = [f"sft.index={root / 'index'}", f"sft.image_root={images}", f"train.init_from={ckpt}",
            f"train.run_dir={tmp_path / 'run'}", "sft.strict=true", "sft.batching=length_group", "sft.shuffle=false",
            "train.max_steps=12", *FAST]
    assert main(["train", "--recipe", "tiny/prm", *_sets(args)]) == 2
    assert "prm.json:" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["sft.index=null"], "sft.index: set it to a SFT index folder"),
    (["train.data_path=/some/packed"], "PRM training reads its step-labelled conversations from sft.index"),
])
def test_prm_recipe_mistakes_fail_before_work(data, tmp_path, capsys, overrides, message):
    root, ckpt, tok, images, rows = data
    run = tmp_path / "never"
    base = [f"sft.index={root / 'index'}", f"train.init_from={ckpt}", f"train.run_dir={run}", *FAST]
    assert main(["train", "--recipe", "tiny/prm", *_sets(base + overrides)]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()
