"""MPO's loss terms, per-pair log-prob sums and reward shift against hand computations."""

import math

import pytest
import torch

from vlmforge.config import load_recipe
from vlmforge.train.mpo import RewardShift, mpo_terms, pair_logps
from vlmforge.train.objectives import MPOObjective

POLICY = torch.tensor([[-3.0, -5.0], [-2.0, -1.5]])  # per pair: chosen, rejected log-prob sums
REFERENCE = torch.tensor([[-3.5, -4.0], [-2.2, -1.0]])
CHOSEN_TOKENS = torch.tensor([3, 2])
BETA, DELTA = 0.1, 0.05


def _log1pexp(x):
    return math.log1p(math.exp(x))


def _by_hand(p):
    r_c = BETA * (float(POLICY[p, 0]) - float(REFERENCE[p, 0]))
    r_r = BETA * (float(POLICY[p, 1]) - float(REFERENCE[p, 1]))
    return {
        "reward_chosen": r_c,
        "reward_rejected": r_r,
        "preference": _log1pexp(-(r_c - r_r)),  # -log sigmoid(r_c - r_r)
        "quality": _log1pexp(-(r_c - DELTA)) + _log1pexp(r_r - DELTA),  # -log s(r_c - d) - log s(-(r_r - d))
        "generation": -float(POLICY[p, 0]) / int(CHOSEN_TOKENS[p]),
    }


def test_each_loss_term_matches_hand_computation():
    t = mpo_terms(POLICY, REFERENCE, CHOSEN_TOKENS, BETA, DELTA)
    for p in range(2):
        want = _by_hand(p)
        for name, value in want.items():
            assert float(getattr(t, name)[p]) == pytest.approx(value, abs=1e-6), (p, name)
    assert float(t.reward_chosen[0]) == pytest.approx(0.05, abs=1e-7)  # 0.1 * (-3.0 + 3.5)
    assert float(t.generation[1]) == pytest.approx(1.0)  # 2.0 / 2 tokens


def test_pair_logps_sums_by_pair_and_side():
    token_logps = torch.tensor([-1.0, -2.0, -0.5, -0.25, -3.0, -1.5])
    target_pair = torch.tensor([0, 0, 1, 0, 1, 1])
    target_side = torch.tensor([0, 1, 0, 0, 1, 1])
    sums, counts = pair_logps(token_logps, target_pair, target_side, 2)
    assert torch.equal(sums, torch.tensor([[-1.25, -2.0], [-0.5, -4.5]]))
    assert torch.equal(counts, torch.tensor([[2, 1], [1, 2]]))


def test_reward_shift_modes():
    cum = RewardShift("cumulative")
    cum.update(2.0, 4)  # rewards summing to 2 over 4
    assert cum.value == 0.5 and cum.count == 4
    cum.update(-1.0, 4)
    assert cum.value == pytest.approx((2.0 - 1.0) / 8) and cum.count == 8  # the mean of all 8 rewards

    ema = RewardShift("ema", momentum=0.9)
    ema.update(2.0, 4)
    assert ema.value == pytest.approx(0.1 * 0.5)  # starts from 0
    ema.update(-1.0, 4)
    assert ema.value == pytest.approx(0.9 * 0.05 + 0.1 * -0.25)

    none = RewardShift("none")
    none.update(5.0, 2)
    assert none.value == 0.0

    again = RewardShift("cumulative")
    again.load_state_dict(cum.state_dict())
    assert again.state_dict() == cum.state_dict()
    with pytest.raises(ValueError, match="reward shift"):
        RewardShift("ema").load_state_dict(cum.state_dict())


class _FixedModel:
    """Stands in for ``run``: returns the per-token log-probs stored in the batch."""

    def __call__(self, batch, output, pred_index, target_ids, **kw):
        assert output == "target_logprobs"
        return batch["token_logps"]


def _micro(pairs: list[int]) -> dict:
    """A micro-batch whose pair p has one chosen token (log-prob POLICY[p, 0] / 1) and one rejected."""
    ids = torch.tensor(pairs)
    n = len(pairs)
    return {
        "pair_ids": ids,
        "target_pair": torch.arange(n).repeat_interleave(2),
        "target_side": torch.tensor([0, 1] * n),
        "target_ids": torch.zeros(2 * n, dtype=torch.long),
        "pred_index": torch.zeros(2 * n, dtype=torch.long),
        "token_logps": torch.stack([POLICY4[ids, 0], POLICY4[ids, 1]], 1).reshape(-1),
    }


POLICY4 = torch.tensor([[-3.0, -5.0], [-2.0, -1.5], [-4.0, -4.5], [-1.0, -3.0]])
REFERENCE4 = torch.tensor([[-3.5, -4.0], [-2.2, -1.0], [-4.1, -4.0], [-1.5, -2.0]])


class _Table:
    def pair_logps(self, batch):
        return REFERENCE4[batch["pair_ids"]]


def test_objective_averages_over_the_pairs_of_the_whole_step_and_updates_the_shift_after_it():
    cfg = load_recipe(None, []).mpo
    obj = MPOObjective(cfg)
    obj.reference = _Table()
    obj.shift.value, obj.shift.count = 0.3, 10  # a shift from earlier steps
    micro = [_micro([0, 1]), _micro([2, 3])]
    stats = dict(obj.step_stats(micro))
    assert stats["pairs"] == 4
    obj.begin_step(stats)
    parts = [obj.micro_loss(_FixedModel(), b, i) for i, b in enumerate(micro)]
    total = sum(float(loss) for loss, _ in parts)
    t = mpo_terms(POLICY4, REFERENCE4, torch.ones(4), cfg.beta, 0.3)
    want = float((0.8 * t.preference + 0.2 * t.quality + 1.0 * t.generation).mean())
    assert total == pytest.approx(want, abs=1e-6)
    sums = {k: sum(float(p[k]) for _, p in parts) for k in parts[0][1]}
    row = obj.end_step(sums, stats, applied=True)
    assert row["loss"] == pytest.approx(want, abs=1e-6)
    assert row["reward_shift"] == 0.3  # the shift the step used
    assert row["rewards/accuracy"] == pytest.approx(float((t.reward_chosen > t.reward_rejected).float().mean()))
    rewards = float(t.reward_chosen.sum() + t.reward_rejected.sum())
    assert obj.shift.value == pytest.approx((0.3 * 10 + rewards) / 18, abs=1e-7) and obj.shift.count == 18
    before = obj.shift.state_dict()
    obj.begin_step(stats)
    obj.end_step(sums, stats, applied=False)  # a skipped (non-finite) step leaves the shift alone
    assert obj.shift.state_dict() == before
