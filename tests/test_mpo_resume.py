"""MPO runs resume exactly: a killed training run (reward shift in the checkpoint), and a killed
reference precompute (its finished parts kept); a reference cache computed from other data or
another initial checkpoint is refused."""

import json
import os
import shutil

import pytest
import torch
from fixtures_train import one_torch_thread
from safetensors.torch import load_file
from test_mpo_train import FakePreferenceLoader, final_delta, fit, make_pairs, run_worker

from vlmforge.errors import UserError
from vlmforge.files import read_metrics
from vlmforge.train.loop import KILL_ENV
from vlmforge.train.reference import KEY_FILE, LOGPS_FILE, REFERENCE_DIR, checkpoint_fingerprint, load_or_precompute

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


def test_kill_and_resume_is_bit_identical_with_the_reward_shift(tmp_path):
    """SIGKILLed after step 3 (checkpoint at 2, whose shift is not 0) and started again: the per-step
    losses, gradient norms and shifts of an uninterrupted run, bit for bit."""
    steps, extra = 4, ["--set", "train.checkpoint_every=2"]
    killed = run_worker(tmp_path / "run", steps, extra, {KILL_ENV: "3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert final_delta(tmp_path / "run")["value"] != 0.0  # the checkpoint at step 2 holds a real shift
    resumed, _ = fit(tmp_path / "run", steps, ["train.checkpoint_every=2"])
    assert resumed.start_step == 2
    fit(tmp_path / "ref", steps, ["train.checkpoint_every=2"])
    keys = ("step", "loss", "grad_norm", "reward_shift", "rewards/chosen", "loss/quality")
    a = [tuple(r[k] for k in keys) for r in read_metrics(tmp_path / "ref")]
    b = [tuple(r[k] for k in keys) for r in read_metrics(tmp_path / "run")]
    assert a == b
    assert final_delta(tmp_path / "ref") == final_delta(tmp_path / "run")


# ---------------------------------------------------------------- the reference cache (no model needed)

KEY = {"data": {"path": "/data/pref-index", "fingerprint": "aaaa" * 16},
       "init": {"path": "/runs/sft/final", "fingerprint": "bbbb" * 16}, "model": {"tokens_per_image": 4}}


class InitialModel:
    """Stands in for the initial model: log-prob sums made from the pair ids; counts its calls and
    dies (like a killed process) at call ``die_at``."""

    def __init__(self, die_at=None):
        self.calls, self.die_at = 0, die_at

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt("killed")
        ids = batch["pair_ids"].float()
        return torch.stack([-ids - 1, -2 * ids - 0.5], 1)


def _loader():
    return FakePreferenceLoader(make_pairs(9, image_token_id=99, vocab=200), micro=2, global_batch=4)


def _precompute(run_dir, model, key=KEY):
    return load_or_precompute(run_dir, key, _loader(), 2, model, torch.device("cpu"), part_pairs=2, progress=False)


def test_a_killed_precompute_continues_from_its_finished_parts(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _precompute(tmp_path, InitialModel(die_at=4))  # 9 pairs in 5 batches of 2: dies in the 4th
    folder = tmp_path / REFERENCE_DIR
    assert not (folder / LOGPS_FILE).exists()
    assert json.loads((folder / KEY_FILE).read_text())["complete"] is False
    assert len(list(folder.glob("part-*.safetensors"))) == 3  # batches 1-3 finished
    again = InitialModel()
    ref = _precompute(tmp_path, again)
    assert again.calls == 2  # only pairs 6, 7 and 8
    stored = load_file(str(folder / LOGPS_FILE))
    assert stored["pair_ids"].tolist() == list(range(9))
    ids = torch.arange(9).float()
    assert torch.equal(stored["logps"], torch.stack([-ids - 1, -2 * ids - 0.5], 1))
    assert not list(folder.glob("part-*"))
    assert json.loads((folder / KEY_FILE).read_text())["complete"] is True
    got = ref.pair_logps({"pair_ids": torch.tensor([8, 0])})
    assert torch.equal(got, torch.tensor([[-9.0, -16.5], [-1.0, -0.5]]))
    with pytest.raises(UserError, match="pair ids \\[9\\]"):
        ref.pair_logps({"pair_ids": torch.tensor([9])})
    third = InitialModel()
    _precompute(tmp_path, third)
    assert third.calls == 0  # complete: read, not recomputed


@pytest.mark.parametrize("changed, named", [
    ("data", "preference index /data/pref-index (fingerprint aaaaaaaaaaaa)"),
    ("init", "initial checkpoint /runs/sft/final (fingerprint bbbbbbbbbbbb)"),
    ("model", "model settings"),
])
def test_a_cache_of_other_data_or_another_checkpoint_is_refused(tmp_path, changed, named):
    _precompute(tmp_path, InitialModel())
    key = json.loads(json.dumps(KEY))
    if changed == "model":
        key["model"]["tokens_per_image"] = 16
    else:
        key[changed] = {"path": f"/new/{changed}", "fingerprint": "cccc" * 16}
    with pytest.raises(UserError) as e:
        _precompute(tmp_path, InitialModel(), key)
    msg = str(e.value)
    assert "\n" not in msg and named in msg and str(tmp_path / REFERENCE_DIR) in msg
    assert "/data/pref-index" in msg and "/runs/sft/final" in msg  # both sides name data and checkpoint
    if changed != "model":
        assert f"/new/{changed} (fingerprint cccccccccccc)" in msg


def test_checkpoint_fingerprint_follows_rewrites_not_copies(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "config.yaml").write_text("name: a\n")
    first = checkpoint_fingerprint(ckpt)
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)  # copy2: times kept
    assert checkpoint_fingerprint(copy) == first
    st = os.stat(ckpt / "model.safetensors")
    os.utime(ckpt / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten
    assert checkpoint_fingerprint(ckpt) != first
    (copy / "config.yaml").write_text("name: b\n")
    assert checkpoint_fingerprint(copy) != first
