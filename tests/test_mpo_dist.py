"""Two ranks under torchrun (gloo, FSDP2) train MPO like one rank: the same losses and reward shift
(each rank precomputes its share of the reference log-probs)."""

import sys
from pathlib import Path

import pytest
import torch
from fixtures_train import one_torch_thread
from safetensors.torch import load_file
from test_mpo_train import NUM_PAIRS, final_delta, fit, run_worker

from vlmforge.files import read_metrics
from vlmforge.train.reference import LOGPS_FILE, REFERENCE_DIR

TORCHRUN = Path(sys.executable).with_name("torchrun")

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_two_ranks_match_one_rank(tmp_path):
    """2 ranks x 1 pair x 2 accumulation steps vs 1 rank x 2 pairs x 2: the same global batches.
    The ranks precompute 5 and 4 of the 9 pairs' reference log-probs (in 3 and 2 batches)."""
    steps = 3
    two = run_worker(tmp_path / "two", steps, ["--set", "train.micro_batch_size=1"],
                     torchrun=[str(TORCHRUN), "--standalone", "--nproc-per-node", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    fit(tmp_path / "one", steps, ["train.micro_batch_size=2"])
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["pairs"] == y["pairs"] == 4
        for key in ("loss", "loss/preference", "loss/quality", "loss/generation", "rewards/chosen", "reward_shift"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key
    assert a[2]["reward_shift"] != 0.0
    da, db = final_delta(tmp_path / "one"), final_delta(tmp_path / "two")
    assert da["count"] == db["count"] and da["value"] == pytest.approx(db["value"], abs=1e-5)
    ra = load_file(str(tmp_path / "one" / REFERENCE_DIR / LOGPS_FILE))
    rb = load_file(str(tmp_path / "two" / REFERENCE_DIR / LOGPS_FILE))
    assert ra["pair_ids"].tolist() == rb["pair_ids"].tolist() == list(range(NUM_PAIRS))
    assert torch.allclose(ra["logps"], rb["logps"], atol=1e-5)
