"""Which rank trains which pack of an optimizer step, so that no rank is much slower than the others.

With dynamic-resolution tiles a pack's vision work varies widely (a pack of text-heavy samples
has few tiles, one of documents many), and in data-parallel training every rank waits for the
slowest. An optimizer step takes ``G = ranks x micro_steps x micro_batch`` packs; a plan puts each
of them in one slot ``[rank, micro_step, b]`` (``micro_batch`` packs per rank per micro-step).

Three plans, each a function ``(vision, llm, ranks, micro_steps, micro_batch) -> slots``:

- :func:`round_robin`: the loaders' split today: micro-step ``a`` is the ``a``-th run of
  ``ranks x micro_batch`` packs in the loader's order, rank ``r`` its ``r``-th slice.
- :func:`sorted_by_vision`: NeMo's remedy: the same split after sorting the step's packs by
  vision tokens (neighbours similar, so each micro-step's packs are alike).
- :func:`balance_step` (ours): the packs are sorted by a combined cost (vision and LLM tokens,
  each divided by its mean over the step) and cut into runs of ``ranks`` packs, heaviest first
  (run ``k`` goes to micro-step ``k // micro_batch``, so a micro-step's packs are alike as in the
  sorted plan); in each run the heaviest pack goes to the rank with the least cost so far (greedy
  LPT, one pack per rank per run; ties: less vision, then the lower rank). Then swaps of two packs
  of the same micro-step between two ranks lower the largest per-rank load of either resource while
  they can (ties: the smaller sum of squared deviations), so vision and LLM tokens are both
  balanced.

Every plan is a pure function of the step's packs (their loads, in the loader's order; ties broken
by position): no randomness, no state. So resume is exact (a step's plan is recomputed from the
step alone), and the set of packs a step trains does not depend on the number of ranks: the
union over ranks of a step's slots is the step's packs, the same ``G`` packs whether ``G`` is
split over 1 rank x G micro-steps or 64 ranks x G/64.

An epoch's order is cut into steps of ``G`` and each is planned alone. :class:`StepPlanner` (what
the loaders use) plans a step when it is first asked for and keeps the last few, so a rank plans
only the steps it reads, when it reads them (resuming mid-epoch plans nothing before the resume
point); :func:`balanced_plan` is the same plan for every step at once (tests, benchmarks).

Two measures (1.0 is perfect): :func:`rank_imbalance`, max over ranks / mean over ranks of a
resource's per-rank total in the step (what a step costs when ranks meet once per step, DDP with
no gradient sync in accumulation); :func:`lockstep_imbalance`, the sum over micro-steps of the
slowest rank / the sum of the mean (ranks meeting every micro-step, as FSDP's per-layer
all-gathers make them).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np

__all__ = ["round_robin", "sorted_by_vision", "balance_step", "StepPlanner", "balanced_plan", "rank_imbalance",
           "lockstep_imbalance", "PLANS"]

Plan = Callable[..., np.ndarray]

# swaps per step at most: a bound on time only (each accepted swap strictly improves the objective)
MAX_SWAPS_PER_PACK = 4


def _check(vision, llm, ranks: int, micro_steps: int, micro_batch: int) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(vision, dtype=np.float64)
    l_ = np.asarray(llm, dtype=np.float64)
    if v.ndim != 1 or v.shape != l_.shape:
        raise ValueError(f"vision and llm must be 1-D of equal length, got shapes {v.shape} and {l_.shape}")
    if min(ranks, micro_steps, micro_batch) < 1:
        raise ValueError(f"ranks, micro_steps, micro_batch must be >= 1, got {ranks}, {micro_steps}, {micro_batch}")
    if v.size != ranks * micro_steps * micro_batch:
        raise ValueError(f"a step of {ranks} ranks x {micro_steps} micro-steps x {micro_batch} packs needs "
                         f"{ranks * micro_steps * micro_batch} packs, got {v.size}")
    if not (np.isfinite(v).all() and np.isfinite(l_).all()) or (v < 0).any() or (l_ < 0).any():
        raise ValueError("pack loads must be finite and >= 0")
    return v, l_


def _deal(order: np.ndarray, ranks: int, micro_steps: int, micro_batch: int) -> np.ndarray:
    """slots[r, a, b] = order[(a * ranks + r) * micro_batch + b]: micro-step a is the a-th run of the order."""
    return order.reshape(micro_steps, ranks, micro_batch).transpose(1, 0, 2).copy()


def round_robin(vision, llm, ranks: int, micro_steps: int, micro_batch: int = 1) -> np.ndarray:
    """The loaders' split today (global batch = micro-step, rank r its r-th slice), in the given order."""
    v, _ = _check(vision, llm, ranks, micro_steps, micro_batch)
    return _deal(np.arange(v.size), ranks, micro_steps, micro_batch)


def sorted_by_vision(vision, llm, ranks: int, micro_steps: int, micro_batch: int = 1) -> np.ndarray:
    """NeMo-style: the loaders' split after a stable sort of the step's packs by vision tokens, most first."""
    v, _ = _check(vision, llm, ranks, micro_steps, micro_batch)
    return _deal(np.argsort(-v, kind="stable"), ranks, micro_steps, micro_batch)


def _common_units(v: np.ndarray, l_: np.ndarray) -> np.ndarray:
    """[n, 2] pack loads in one unit: v / mean(v) and l / mean(l), both times sum(v) * sum(l) / n, i.e.
    v * sum(l) and l * sum(v). Integer token counts stay exact integers, so ties are exact ties."""
    sv, sl = v.sum(), l_.sum()
    if sv == 0 or sl == 0:  # a resource absent from the step: balance the other alone
        return np.stack([v, l_], axis=1)
    return np.stack([v * sl, l_ * sv], axis=1)


def balance_step(vision, llm, ranks: int, micro_steps: int, micro_batch: int = 1) -> np.ndarray:
    """Our plan for one step: slots[rank, micro_step, b] = pack index; see the module docstring."""
    v, l_ = _check(vision, llm, ranks, micro_steps, micro_batch)
    n = v.size
    x = _common_units(v, l_)  # both resources relative to their mean, so loads compare across them
    cost = x.sum(axis=1)
    order = np.lexsort((np.arange(n), -x[:, 0], -cost))  # heaviest first; ties: more vision, then position
    runs = n // ranks
    pick = np.empty((ranks, runs), np.int64)  # pick[r, k]: the pack of run k on rank r
    load = np.zeros((ranks, 2))
    for k in range(runs):
        # rank with the least cost so far takes the heaviest remaining pack of the run
        by_load = np.lexsort((np.arange(ranks), load[:, 0], load.sum(axis=1)))
        pick[by_load, k] = order[k * ranks:(k + 1) * ranks]
        load += x[pick[:, k]]
    # run k = micro_step k // micro_batch, slot k % micro_batch
    slots = pick.reshape(ranks, micro_steps, micro_batch).copy()
    if ranks > 1:
        _swap_down(x, slots, load)
    return slots


def _swap_down(x: np.ndarray, slots: np.ndarray, load: np.ndarray) -> None:
    """Swap two packs of one micro-step between the most loaded rank and another while that lowers
    (largest load over ranks and resources, sum of squared deviations from the mean), lexicographically."""
    ranks, micro_steps, micro_batch = slots.shape
    scale = load.mean()
    if scale <= 0:
        return
    x, load = x / scale, load / scale  # mean rank load ~1: float noise stays far below eps
    eps = 1e-12
    target = load.mean(axis=0)
    ar = np.arange(ranks)
    for _ in range(MAX_SWAPS_PER_PACK * slots.size):
        worst = load.max()
        w = int(np.unravel_index(np.argmax(load), load.shape)[0])
        # the largest load of each resource among ranks other than w and r, for every r
        rest = load.copy()
        rest[w] = -np.inf
        top = np.argmax(rest, axis=0)
        first = rest[top, [0, 1]]
        rest[top, [0, 1]] = -np.inf
        second = rest.max(axis=0)
        others = np.where(ar[:, None] == top[None, :], second[None, :], first[None, :])  # [R, 2]
        # delta[a, b, r, c]: what rank w gains by giving its pack (a, b) for rank r's pack (a, c)
        mine = x[slots[w]]  # [A, B, 2]
        theirs = x[slots].transpose(1, 0, 2, 3)  # [A, R, B, 2]
        delta = theirs[:, None, :, :, :] - mine[:, :, None, None, :]  # [A, B, R, B, 2]
        new_w = load[w] + delta
        new_r = load[None, None, :, None, :] - delta
        new_max = np.maximum(np.maximum(new_w, new_r), others[None, None, :, None, :]).max(axis=-1)
        dev = ((new_w - target) ** 2 + (new_r - target) ** 2).sum(axis=-1) \
            - ((load[w] - target) ** 2).sum() - ((load - target) ** 2).sum(axis=1)[None, None, :, None]
        new_max[:, :, w, :] = np.inf
        best = np.lexsort((dev.ravel(), new_max.ravel()))[0]
        a, b, r, c = np.unravel_index(best, new_max.shape)
        if not (new_max[a, b, r, c] < worst - eps or (new_max[a, b, r, c] <= worst + eps and dev[a, b, r, c] < -eps)):
            return
        p, q = slots[w, a, b], slots[r, a, c]
        slots[w, a, b], slots[r, a, c] = q, p
        load[w] += x[q] - x[p]
        load[r] += x[p] - x[q]


PLANS: dict[str, Plan] = {"round_robin": round_robin, "sorted": sorted_by_vision, "balanced": balance_step}


class StepPlanner:
    """An epoch's balanced deal, one step at a time.

    ``order`` (pack ids in the loader's order) is cut into :attr:`steps` steps of ``ranks x
    micro_steps x micro_batch`` packs; :meth:`slots` ``(s)`` is step ``s``'s pack ids
    ``[ranks, micro_steps, micro_batch]`` under ``plan``, computed when first asked for (from that
    step's packs alone) and kept in an LRU cache of ``cache`` steps. ``vision`` / ``llm`` are
    indexed by pack id."""

    def __init__(self, vision, llm, order, ranks: int, micro_steps: int, micro_batch: int = 1,
                 plan: Plan = balance_step, cache: int = 4):
        self.vision = np.asarray(vision, dtype=np.float64)
        self.llm = np.asarray(llm, dtype=np.float64)
        self.order = np.asarray(order, dtype=np.int64)
        self.ranks, self.micro_steps, self.micro_batch = int(ranks), int(micro_steps), int(micro_batch)
        self.per_step = self.ranks * self.micro_steps * self.micro_batch
        if self.order.ndim != 1 or self.order.size % self.per_step:
            raise ValueError(f"the order must be whole steps of {self.per_step} packs, got {self.order.size} packs")
        if cache < 1:
            raise ValueError(f"cache must be >= 1 step, got {cache}")
        self.steps = self.order.size // self.per_step
        self.plan, self.cache = plan, int(cache)
        self._cached: OrderedDict[int, np.ndarray] = OrderedDict()

    def slots(self, step: int) -> np.ndarray:
        """Pack ids ``[ranks, micro_steps, micro_batch]`` of ``step`` (read-only)."""
        step = int(step)
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} out of range ({self.steps} steps)")
        got = self._cached.get(step)
        if got is not None:
            self._cached.move_to_end(step)
            return got
        ids = self.order[step * self.per_step:(step + 1) * self.per_step]
        got = ids[self.plan(self.vision[ids], self.llm[ids], self.ranks, self.micro_steps, self.micro_batch)]
        got.flags.writeable = False  # shared with the cache
        self._cached[step] = got
        if len(self._cached) > self.cache:
            self._cached.popitem(last=False)
        return got

    def rank_batch(self, rank: int, j: int) -> np.ndarray:
        """Rank ``rank``'s ``j``-th micro-batch of the epoch: step ``j // micro_steps``, that
        micro-step's ``micro_batch`` pack ids."""
        step, micro = divmod(int(j), self.micro_steps)
        return self.slots(step)[rank, micro]


def balanced_plan(vision, llm, order, ranks: int, micro_steps: int, micro_batch: int = 1,
                  plan: Plan = balance_step) -> np.ndarray:
    """An epoch's plan at once: :meth:`StepPlanner.slots` of every step, stacked. Returns pack ids
    ``[steps, ranks, micro_steps, micro_batch]``; ``vision`` / ``llm`` are indexed by pack id."""
    planner = StepPlanner(vision, llm, order, ranks, micro_steps, micro_batch, plan=plan, cache=1)
    out = np.empty((planner.steps, ranks, micro_steps, micro_batch), np.int64)
    for s in range(planner.steps):
        out[s] = planner.slots(s)
    return out


def rank_imbalance(values, slots: np.ndarray) -> float:
    """max / mean over ranks of each rank's total of ``values`` (per pack) in the step; 1.0 = balanced."""
    per_rank = np.asarray(values, dtype=np.float64)[slots].reshape(slots.shape[0], -1).sum(axis=1)
    mean = per_rank.mean()
    return float(per_rank.max() / mean) if mean > 0 else 1.0


def lockstep_imbalance(values, slots: np.ndarray) -> float:
    """Sum over micro-steps of the largest rank's share / sum of the mean: the step's cost when
    ranks wait for each other at every micro-step, relative to perfect balance."""
    per = np.asarray(values, dtype=np.float64)[slots].sum(axis=2)  # [ranks, micro_steps]
    mean = per.mean(axis=0).sum()
    return float(per.max(axis=0).sum() / mean) if mean > 0 else 1.0
