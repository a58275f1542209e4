"""Balanced ranks (data.balance): which rank trains which pack of an optimizer step."""

import itertools

import numpy as np
import pytest

from vlmforge.data.balance import (
    PLANS,
    StepPlanner,
    balance_step,
    balanced_plan,
    lockstep_imbalance,
    rank_imbalance,
    round_robin,
    sorted_by_vision,
)


def assert_every_pack_once(slots, n, ranks, micro_steps, micro_batch):
    assert slots.shape == (ranks, micro_steps, micro_batch)
    np.testing.assert_array_equal(np.sort(slots.ravel()), np.arange(n))


def totals(values, slots):
    return np.asarray(values)[slots].reshape(slots.shape[0], -1).sum(axis=1).tolist()


@pytest.mark.parametrize("name", list(PLANS))
def test_every_pack_exactly_once_fuzz(name):
    rng = np.random.default_rng(0)
    for _ in range(200):
        ranks, micro_steps, micro_batch = (int(rng.integers(1, k)) for k in (9, 6, 4))
        n = ranks * micro_steps * micro_batch
        vision = rng.integers(0, 5, n) * int(rng.integers(0, 2)) * 256  # many ties, sometimes all zero
        llm = vision + rng.integers(0, 3, n) * 100
        if rng.random() < 0.3:
            vision, llm = vision * 0.37, llm * 1.1  # float loads
        slots = PLANS[name](vision, llm, ranks, micro_steps, micro_batch)
        assert_every_pack_once(slots, n, ranks, micro_steps, micro_batch)


def test_plans_are_deterministic():
    rng = np.random.default_rng(1)
    vision, llm = rng.integers(0, 16384, 128), rng.integers(8000, 16384, 128)
    for plan in PLANS.values():
        a, b = plan(vision, llm, 8, 16), plan(vision.copy(), llm.copy(), 8, 16)
        np.testing.assert_array_equal(a, b)


def test_round_robin_is_the_loaders_split():
    # micro-step a is the a-th run of ranks x micro_batch packs, rank r its r-th slice
    slots = round_robin(np.ones(12), np.ones(12), 2, 3, 2)
    assert slots.tolist() == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [10, 11]]]
    slots = sorted_by_vision([1, 5, 3, 4], [1, 1, 1, 1], 2, 2)
    assert slots[:, :, 0].tolist() == [[1, 2], [3, 0]]  # sorted 5, 4, 3, 1 then dealt the same way


def test_hand_worked_one_resource():
    # vision 8, 6, 4, 2 on 2 ranks x 2 micro-steps, LLM equal. Sorted by cost: 0, 1 | 2, 3.
    # Run 1: rank 0 <- 8, rank 1 <- 6. Run 2: rank 1 (less so far) <- 4, rank 0 <- 2: 10 and 10.
    vision, llm = [8, 6, 4, 2], [10, 10, 10, 10]
    slots = balance_step(vision, llm, 2, 2)
    assert slots[:, :, 0].tolist() == [[0, 3], [1, 2]]
    assert totals(vision, slots) == [10, 10] and rank_imbalance(vision, slots) == 1.0
    rr = round_robin(vision, llm, 2, 2)  # rank 0: 8 + 4, rank 1: 6 + 2
    assert totals(vision, rr) == [12, 8] and rank_imbalance(vision, rr) == pytest.approx(1.2)
    assert rank_imbalance(vision, sorted_by_vision(vision, llm, 2, 2)) == pytest.approx(1.2)


def test_hand_worked_ties_go_to_the_rank_with_less_vision():
    # vision 7, 5, 0, 2 and LLM 2, 4, 5, 3 (both sum to 14, so the cost is vision + LLM): costs
    # 9, 9, 5, 5, heaviest first with more vision first: 0, 1 | 3, 2. After run 1 both ranks
    # have cost 9; rank 1 has less vision (5 < 7) so it takes pack 3: 7 + 0 and 5 + 2 vision,
    # 2 + 5 and 4 + 3 LLM: both resources exactly balanced.
    vision, llm = [7, 5, 0, 2], [2, 4, 5, 3]
    slots = balance_step(vision, llm, 2, 2)
    assert slots[:, :, 0].tolist() == [[0, 2], [1, 3]]
    assert totals(vision, slots) == [7, 7] and totals(llm, slots) == [7, 7]


def test_hand_worked_swap_balances_both_resources():
    # vision 0, 5, 8, 7 and LLM 4, 3, 4, 9 (sums 20 and 20): costs 4, 8, 12, 16 -> runs {3, 2}, {1, 0}.
    # Greedy: rank 0 <- 3, rank 1 <- 2, then rank 1 <- 1, rank 0 <- 0: vision 7 / 13, LLM 13 / 7
    # (1.3 either way). Swapping one run gives vision 8 / 12 and LLM 8 / 12: 1.2, the best any
    # split into pairs can do.
    vision, llm = [0, 5, 8, 7], [4, 3, 4, 9]
    slots = balance_step(vision, llm, 2, 2)
    assert slots[:, :, 0].tolist() == [[2, 0], [3, 1]]
    assert totals(vision, slots) == [8, 12] and totals(llm, slots) == [8, 12]
    best = min(max(rank_imbalance(vision, s), rank_imbalance(llm, s)) for s in all_plans(4, 2))
    assert best == pytest.approx(1.2)


def all_plans(n, ranks):
    """Every split of n packs into ranks equal groups, as [ranks, n // ranks, 1] slots."""
    per = n // ranks

    def rec(rest):
        if not rest:
            yield []
            return
        for others in itertools.combinations(rest[1:], per - 1):
            group = (rest[0], *others)
            for tail in rec([p for p in rest if p not in group]):
                yield [group, *tail]

    for groups in rec(list(range(n))):
        yield np.array(groups)[:, :, None]


def test_micro_steps_hold_alike_packs_and_lockstep_cost_is_minimal():
    # vision 1, 9, 2, 8: the loaders' order puts 1 and 9 in micro-step 0 and 2 and 8 in micro-step 1:
    # ranks meeting every micro-step wait for 9 + 8 = 17 where the mean is 5 + 5. Ours puts 9 and 8
    # together (micro-step 0) and 2 and 1 together: 9 + 2 = 11, the least possible (9 must be
    # waited for; the other micro-step holds at least one pack beyond the two largest).
    vision, llm = [1, 9, 2, 8], [10, 10, 10, 10]
    ours, rr = balance_step(vision, llm, 2, 2), round_robin(vision, llm, 2, 2)
    assert sorted(ours[:, 0, 0].tolist()) == [1, 3] and sorted(ours[:, 1, 0].tolist()) == [0, 2]
    assert lockstep_imbalance(vision, rr) == pytest.approx(17 / 10)
    assert lockstep_imbalance(vision, ours) == pytest.approx(11 / 10)
    assert totals(vision, ours) == [10, 10] and totals(vision, rr) == [3, 17]


def test_micro_batch_holds_several_packs_per_slot():
    vision, llm = [4, 3, 2, 1], [5, 5, 5, 5]
    slots = balance_step(vision, llm, 2, 1, 2)  # runs {0, 1}, {2, 3}
    assert slots.tolist() == [[[0, 3]], [[1, 2]]]
    assert totals(vision, slots) == [5, 5]


def test_two_packs_per_rank_reach_the_best_pairing():
    # one resource, 2 packs per rank: the best possible largest rank pairs the i-th largest pack
    # with the i-th smallest; ours finds it
    rng = np.random.default_rng(2)
    for _ in range(50):
        ranks = int(rng.integers(2, 40))
        vision = rng.integers(0, 16384, 2 * ranks)
        s = np.sort(vision)
        best = (s[:ranks] + s[::-1][:ranks]).max()
        slots = balance_step(vision, np.full(2 * ranks, 16384), ranks, 2)
        assert max(totals(vision, slots)) == best


def test_single_rank_and_empty_resources():
    slots = balance_step([3, 1, 2], [1, 1, 1], 1, 3)
    assert slots[0, :, 0].tolist() == [0, 2, 1]  # heaviest micro-step first
    text_only = balance_step(np.zeros(8), [9, 1, 8, 2, 7, 3, 6, 4], 2, 4)
    assert totals([9, 1, 8, 2, 7, 3, 6, 4], text_only) == [20, 20]
    assert_every_pack_once(balance_step(np.zeros(6), np.zeros(6), 3, 2), 6, 3, 2, 1)
    assert rank_imbalance(np.zeros(6), round_robin(np.zeros(6), np.zeros(6), 3, 2)) == 1.0


def test_ours_beats_the_loaders_order_and_the_sort_on_tiled_packs():
    rng = np.random.default_rng(3)
    vision = 256 * rng.integers(0, 64, (60, 128))  # 0..63 tiles of 256 tokens per pack
    llm = np.minimum(vision + rng.integers(2000, 16384, (60, 128)), 16384)
    scores = {name: [] for name in PLANS}
    for v, l_ in zip(vision, llm):
        for name, plan in PLANS.items():
            s = plan(v, l_, 8, 16)
            scores[name].append(max(rank_imbalance(v, s), rank_imbalance(l_, s)))
    mean = {k: float(np.mean(x)) for k, x in scores.items()}
    assert mean["balanced"] < mean["sorted"] and mean["balanced"] < mean["round_robin"]
    assert mean["balanced"] <= 1.02


@pytest.mark.parametrize("name", list(PLANS))
def test_a_steps_packs_do_not_depend_on_the_rank_count(name):
    # the union over ranks of step s's slots is the same set of packs, the loader's s-th run of
    # G packs, for every split of G into ranks x micro-steps x micro-batch
    rng = np.random.default_rng(4)
    g, steps = 48, 5
    vision, llm = rng.integers(0, 8000, 300), rng.integers(4000, 16384, 300)
    order = rng.permutation(300)[: g * steps]
    splits = [(r, g // (r * b), b) for b in (1, 2) for r in (1, 2, 3, 4, 6, 8, 12, 24) if g % (r * b) == 0]
    for ranks, micro_steps, micro_batch in splits:
        plan = balanced_plan(vision, llm, order, ranks, micro_steps, micro_batch, plan=PLANS[name])
        assert plan.shape == (steps, ranks, micro_steps, micro_batch)
        for s in range(steps):
            np.testing.assert_array_equal(np.sort(plan[s].ravel()), np.sort(order[s * g:(s + 1) * g]))


def test_a_steps_plan_depends_only_on_that_step_so_resume_is_exact():
    rng = np.random.default_rng(5)
    g = 32
    vision, llm = rng.integers(0, 8000, 200), rng.integers(4000, 16384, 200)
    order = rng.permutation(200)[: 5 * g]
    full = balanced_plan(vision, llm, order, 4, 8)
    for s in range(5):
        resumed = balanced_plan(vision, llm, order[s * g:], 4, 8)
        np.testing.assert_array_equal(resumed[0], full[s])
    other = vision.copy()
    outside = np.setdiff1d(np.arange(200), order[:g])
    other[outside] = rng.integers(0, 8000, outside.size)  # other packs' loads change
    np.testing.assert_array_equal(balanced_plan(other, llm, order[:g], 4, 8)[0], full[0])


class Counting:
    """A plan that records the loads of every step it is asked to plan."""

    def __init__(self, plan=balance_step):
        self.plan, self.calls = plan, []

    def __call__(self, vision, llm, ranks, micro_steps, micro_batch):
        self.calls.append((vision.tolist(), llm.tolist()))
        return self.plan(vision, llm, ranks, micro_steps, micro_batch)


@pytest.mark.parametrize("ranks,micro_steps,micro_batch", [(4, 2, 1), (2, 2, 2), (1, 8, 1)])
def test_the_step_planner_plans_only_the_steps_asked_for_and_equals_balanced_plan(ranks, micro_steps, micro_batch):
    rng = np.random.default_rng(6)
    g, steps = ranks * micro_steps * micro_batch, 7
    vision, llm = rng.integers(0, 8000, 100), rng.integers(4000, 16384, 100)
    order = rng.permutation(100)[: g * steps]
    full = balanced_plan(vision, llm, order, ranks, micro_steps, micro_batch)
    count = Counting()
    planner = StepPlanner(vision, llm, order, ranks, micro_steps, micro_batch, plan=count, cache=2)
    assert planner.steps == steps and count.calls == []  # nothing planned up front
    # a resume at step 5: steps 0..4 are never planned; each read step is planned once while cached
    for s in (5, 5, 6, 6, 5):
        np.testing.assert_array_equal(planner.slots(s), full[s])
    assert len(count.calls) == 2
    ids = order[5 * g:6 * g]
    assert count.calls[0] == (vision[ids].astype(float).tolist(), llm[ids].astype(float).tolist())
    # every micro-batch of every rank, in the loader's reading order, is balanced_plan's slot
    for r in range(ranks):
        for j in range(steps * micro_steps):
            np.testing.assert_array_equal(planner.rank_batch(r, j), full[j // micro_steps, r, j % micro_steps])
    # the LRU keeps 2 steps: step 0 was evicted by the later ones, so asking again plans it again
    before = len(count.calls)
    planner.slots(steps - 1)
    assert len(count.calls) == before
    planner.slots(0)
    assert len(count.calls) == before + 1
    with pytest.raises(IndexError, match="out of range"):
        planner.slots(steps)
    with pytest.raises(ValueError, match=f"whole steps of {g}"):
        StepPlanner(vision, llm, order[:-1], ranks, micro_steps, micro_batch)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="needs 8 packs, got 6"):
        balance_step(np.ones(6), np.ones(6), 2, 4)
    with pytest.raises(ValueError, match="equal length"):
        balance_step(np.ones(4), np.ones(5), 2, 2)
    with pytest.raises(ValueError, match=">= 0"):
        balance_step([1, -1], [1, 1], 2, 1)
    with pytest.raises(ValueError, match=">= 1"):
        balance_step([1, 1], [1, 1], 0, 1)
    with pytest.raises(ValueError, match="whole steps of 8"):
        balanced_plan(np.ones(20), np.ones(20), np.arange(12), 2, 4)
