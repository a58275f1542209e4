"""MPO in the training loop on the real tiny VLM with hand-built preference batches (the batch
contract of vlmforge.data.preference): the update does not depend on the order of the pairs or on
the micro-batch split (reward shift included), precomputed and live reference log-probs give the
same losses, and the two layouts train alike. The helpers here serve test_mpo_resume.py and
test_mpo_dist.py too.

Also a worker: ``python tests/test_mpo_train.py RUN_DIR STEPS [--set key=value ...]`` (or under
torchrun) trains the tiny VLM with MPO on the fake preference loader below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest
import torch
from fixtures_train import TOKENS_PER_IMAGE, build_tiny_vlm, one_torch_thread, tiny_recipe

from vlmforge import dist as vdist
from vlmforge.files import read_metrics
from vlmforge.train.loop import Trainer
from vlmforge.train.objectives import MPOObjective
from vlmforge.train.reference import REFERENCE_DIR, PrecomputedReference

HERE = Path(__file__).parent
NUM_PAIRS = 9  # odd: two ranks get 5 and 4 pairs to precompute
KEY = {"data": {"path": "fake", "fingerprint": "d0"}, "init": {"path": "tiny", "fingerprint": "i0"}, "model": {}}


# ---------------------------------------------------------------- hand-built preference batches


@dataclass
class Pair:
    pair_id: int
    prompt: list[int]  # image placeholders expanded
    chosen: list[int]
    rejected: list[int]
    image: torch.Tensor | None


def make_pairs(n: int, image_token_id: int, vocab: int, seed: int = 3, image_size: int = 64) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        return torch.randint(5, vocab - 2, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    pairs = []
    for i in range(n):
        chosen, rejected = text(2, 7), text(2, 7)
        while rejected == chosen:
            rejected = text(2, 7)
        pairs.append(Pair(i, [image_token_id] * TOKENS_PER_IMAGE + text(2, 6), chosen, rejected,
                          torch.randn(3, image_size, image_size, generator=g)))
    return pairs


def preference_batch(pairs: list[Pair], layout: str = "shared") -> dict[str, torch.Tensor]:
    """One micro-batch in the contract's format: shared = one row [prompt][chosen][rejected] per pair
    (rejected's positions continue from the prompt's end, its first token predicted from the
    prompt's last position); duplicated = rows prompt+chosen, prompt+rejected, each image once."""
    rows, targets = [], []  # rows: (ids, positions, branch); targets: (row, column predicting, id, pair, side)
    for p, pair in enumerate(pairs):
        n = len(pair.prompt)
        if layout == "shared":
            r = len(rows)
            ids = pair.prompt + pair.chosen + pair.rejected
            pos = list(range(n + len(pair.chosen))) + list(range(n, n + len(pair.rejected)))
            branch = [0] * n + [1] * len(pair.chosen) + [2] * len(pair.rejected)
            rows.append((ids, pos, branch))
            targets += [(r, n + k - 1, t, p, 0) for k, t in enumerate(pair.chosen)]
            start = n + len(pair.chosen)
            targets += [(r, (n - 1) if k == 0 else start + k - 1, t, p, 1) for k, t in enumerate(pair.rejected)]
        else:
            for side, resp in enumerate((pair.chosen, pair.rejected)):
                r = len(rows)
                rows.append((pair.prompt + resp, list(range(n + len(resp))), None))
                targets += [(r, n + k - 1, t, p, side) for k, t in enumerate(resp)]
    width = max(len(ids) for ids, _, _ in rows)
    R = len(rows)
    input_ids = torch.zeros(R, width, dtype=torch.long)
    position_ids = torch.zeros(R, width, dtype=torch.long)
    seq_ids = torch.full((R, width), -1, dtype=torch.long)
    branch_ids = torch.full((R, width), -1, dtype=torch.long)
    for r, (ids, pos, branch) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        position_ids[r, : len(ids)] = torch.tensor(pos)
        seq_ids[r, : len(ids)] = 0
        if branch is not None:
            branch_ids[r, : len(ids)] = torch.tensor(branch)
    batch = {
        "input_ids": input_ids, "position_ids": position_ids, "seq_ids": seq_ids,
        "pred_index": torch.tensor([r * width + c for r, c, _, _, _ in targets]),
        "target_ids": torch.tensor([t for _, _, t, _, _ in targets]),
        "target_pair": torch.tensor([p for _, _, _, p, _ in targets]),
        "target_side": torch.tensor([s for _, _, _, _, s in targets]),
        "pair_ids": torch.tensor([pair.pair_id for pair in pairs]),
        "pixel_values": torch.stack([pair.image for pair in pairs]),
    }
    if layout == "shared":
        batch["branch_ids"] = branch_ids
    else:
        batch["image_map"] = torch.tensor([p for p in range(len(pairs)) for _ in (0, 1)])
    return batch


class FakePreferenceLoader:
    """The preference loader's protocol over hand-built pairs. The k-th micro-batch of rank r belongs
    to optimizer step k // accum; a step's global batch is pairs [step*G, (step+1)*G) of ``order``
    (cycling), split contiguously over ranks and then micro-batches, so every rank layout and split
    sees the same global batches. ``reference_batches``: pair i on rank i % world, in index order."""

    def __init__(self, pairs, micro, global_batch, rank=0, world=1, layout="shared", order=None):
        self.pairs, self.micro, self.global_batch = pairs, micro, global_batch
        self.rank, self.world, self.layout = rank, world, layout
        self.accum = global_batch // (micro * world)
        self.order = list(order) if order is not None else list(range(len(pairs)))
        self.k = 0
        self.epoch = 0
        self.skipped: dict[str, int] = {}
        self.reference_skipped: dict[str, int] = {}
        self.reference_calls = 0

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, sd):
        self.k = int(sd["k"])

    def batches_per_epoch(self, epoch=0):
        return 10**6

    def batch(self, k):
        step, m = divmod(k, self.accum)
        start = step * self.global_batch + self.rank * self.accum * self.micro + m * self.micro
        picked = [self.pairs[self.order[(start + i) % len(self.order)]] for i in range(self.micro)]
        return preference_batch(picked, self.layout)

    def __iter__(self):
        while True:
            b = self.batch(self.k)
            self.k += 1
            yield b

    def reference_batches(self, batch_size):
        mine = self.pairs[self.rank :: self.world]
        for i in range(0, len(mine), batch_size):
            self.reference_calls += 1
            yield preference_batch(mine[i : i + batch_size], self.layout)


def mpo_setup(overrides=(), rank=0, world=1, layout="shared", order=None, reference=None, objective_kw=None,
              dtype=None):
    """(cfg, model, loader, objective) for the tiny VLM; ``reference``: a PrecomputedReference to use
    instead of precomputing one; ``dtype``: the model's and images' dtype (default fp32)."""
    cfg = tiny_recipe(["train.stage=mpo", "train.objective=mpo", "train.global_batch_size=4",
                       "train.micro_batch_size=2", *overrides])
    model = build_tiny_vlm(cfg, seed=0)
    pairs = make_pairs(NUM_PAIRS, model.image_token_id, model.llm.get_input_embeddings().num_embeddings)
    if dtype is not None:
        model.to(dtype)
        for pair in pairs:
            pair.image = pair.image.to(dtype)
    t = cfg.train
    loader = FakePreferenceLoader(pairs, t.micro_batch_size, t.global_batch_size, rank, world, layout, order)
    objective = MPOObjective(cfg.mpo, loader=loader, reference_key=KEY, reference_batch_size=2, progress=False,
                             **(objective_kw or {}))
    objective.reference = reference
    return cfg, model, loader, objective


def fit(run_dir, steps, overrides=(), **kw):
    cfg, model, loader, objective = mpo_setup([f"train.max_steps={steps}", *overrides], **kw)
    trainer = Trainer(cfg.train, model, loader, steps, run_dir, torch.device("cpu"), objective=objective)
    return trainer.fit(), trainer


def offset_reference(seed: int = 0) -> PrecomputedReference:
    """Reference log-probs unlike the initial model's, so rewards (and the shift) are not 0 at step 1."""
    g = torch.Generator().manual_seed(seed)
    return PrecomputedReference(torch.arange(NUM_PAIRS), -30 + 20 * torch.rand(NUM_PAIRS, 2, generator=g))


def final_delta(run_dir) -> dict:
    ckpt = Path(run_dir) / "checkpoints"
    state = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "trainer_state.json").read_text())
    return state["objective"]["reward_shift"]


_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)


# ---------------------------------------------------------------- tests


def test_split_and_order_do_not_change_the_update(tmp_path):
    """Global batch 4 as 1 x 4 pairs, 4 x 1, and 2 x 2 with the pairs of each step reordered: the
    same weights and reward shift after two steps (the second uses the shift the first set).

    The model runs in float64: in fp32 the padding a micro-batch gets changes attention sums in the
    last bits, and AdamW's first, nearly sign-like update magnifies that on weights whose gradient
    is about 0. The log-probs (and so the rewards and the shift) stay fp32, summed in another order."""
    runs = {
        "1x4": dict(overrides=["train.micro_batch_size=4"]),
        "4x1": dict(overrides=["train.micro_batch_size=1"]),
        "2x2-reordered": dict(overrides=["train.micro_batch_size=2"], order=[2, 0, 3, 1, 7, 5, 4, 6, 8]),
    }
    weights, deltas, rows = {}, {}, {}
    for name, kw in runs.items():
        _, trainer = fit(tmp_path / name, 2, reference=offset_reference(), dtype=torch.float64, **kw)
        weights[name] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        deltas[name] = trainer.objective.shift.value
        rows[name] = read_metrics(tmp_path / name)
    base = "1x4"
    assert deltas[base] != 0.0
    for name in runs:
        diff = max(float((weights[name][k] - weights[base][k]).abs().max()) for k in weights[base])
        assert diff <= 1e-9, f"{name}: weights differ from {base} by {diff}"
        assert deltas[name] == pytest.approx(deltas[base], abs=1e-6)
        for a, b in zip(rows[name], rows[base]):
            for key in ("loss", "loss/preference", "loss/quality", "loss/generation", "rewards/chosen",
                        "rewards/rejected", "rewards/accuracy", "reward_shift"):
                assert a[key] == pytest.approx(b[key], abs=1e-6), (name, key)
    # the shift is the mean of every reward of step 1 (2 x 4 of them), held fixed in step 2
    r1 = rows[base][0]
    assert rows[base][0]["reward_shift"] == 0.0
    assert rows[base][1]["reward_shift"] == pytest.approx((r1["rewards/chosen"] + r1["rewards/rejected"]) / 2, abs=1e-9)


def test_metrics_logged_per_step(tmp_path):
    fit(tmp_path / "m", 2, reference=offset_reference())
    rows = read_metrics(tmp_path / "m")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "loss/preference", "loss/quality", "loss/generation", "rewards/chosen", "rewards/rejected",
                "rewards/margin", "rewards/accuracy", "reward_shift", "pairs", "grad_norm", "lr/llm"):
        assert key in rows[0], key
    r = rows[0]
    assert r["pairs"] == 4 and 0.0 <= r["rewards/accuracy"] <= 1.0
    assert r["rewards/margin"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-9)
    assert r["loss"] == pytest.approx(0.8 * r["loss/preference"] + 0.2 * r["loss/quality"] + r["loss/generation"], abs=1e-9)


def test_precompute_equals_live_reference(tmp_path):
    """Precomputed reference log-probs (another batching of the pairs, written to the run folder)
    and a live frozen copy of the initial model give the same losses and shift."""
    a, ta = fit(tmp_path / "pre", 3)
    b, tb = fit(tmp_path / "live", 3, overrides=["mpo.reference=live"])
    assert (tmp_path / "pre" / REFERENCE_DIR / "logps.safetensors").is_file()
    assert not (tmp_path / "live" / REFERENCE_DIR).exists()
    ra, rb = read_metrics(tmp_path / "pre"), read_metrics(tmp_path / "live")
    for x, y in zip(ra, rb):
        for key in ("loss", "loss/preference", "loss/quality", "rewards/chosen", "rewards/rejected", "reward_shift"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key
    assert ra[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)  # step 1: the policy is the reference
    assert ra[2]["reward_shift"] != 0.0
    # the live copy stayed the initial model while the policy moved
    live = tb.objective.live.model
    assert not any(p.requires_grad for p in live.parameters()) and not live.training


def test_shared_and_duplicated_layouts_train_alike(tmp_path):
    fit(tmp_path / "shared", 2, reference=offset_reference(), layout="shared")
    fit(tmp_path / "dup", 2, reference=offset_reference(), layout="duplicated")
    for x, y in zip(read_metrics(tmp_path / "shared"), read_metrics(tmp_path / "dup")):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "reward_shift", "grad_norm"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key


def run_worker(root, steps, extra=(), env_extra=None, torchrun=None):
    """This file's ``main`` in a subprocess (plain python, or torchrun's command line)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [*(torchrun or [sys.executable]), str(HERE / "test_mpo_train.py"), str(root), str(steps), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def main(argv: list[str]) -> None:
    root, steps = argv[0], int(argv[1])
    overrides = [a for a in argv[2:] if a != "--set"]
    info = vdist.init_distributed("cpu")
    torch.set_num_threads(1)
    cfg, model, loader, objective = mpo_setup([f"train.max_steps={steps}", *overrides],
                                              rank=info.rank, world=info.world_size)
    Trainer(cfg.train, model, loader, steps, root, info.device, objective=objective).fit()
    vdist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
