"""InternVL's Mixed Preference Optimization: the per-pair loss terms and the BCO reward shift.

For a pair (prompt x, chosen y_c, rejected y_r) with log-probabilities summed over the response
tokens, the reward of a response is ``r = beta * (log pi(y|x) - log pi_ref(y|x))`` and

- preference (DPO, sigmoid): ``-log sigmoid(r_c - r_r)``
- quality (BCO): ``-log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta))``, delta the reward shift
- generation (LM): ``-log pi(y_c|x) / |y_c|``

each averaged over the pairs of the optimizer step; the loss is ``w_p L_p + w_q L_q + w_g L_g``.
Every term is a sum over pairs of something that depends on that pair only (delta is held fixed
inside a step), so a step's gradient does not depend on how its pairs are split into micro-batches
or ranks, nor on their order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CHOSEN, REJECTED = 0, 1  # target_side values of the preference batch


def pair_logps(token_logps: torch.Tensor, target_pair: torch.Tensor, target_side: torch.Tensor,
               num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob sums, token counts), both [P, 2] (column 0 chosen, 1 rejected), from per-token
    log-probs [T] and the pair / side each target token belongs to."""
    key = target_pair * 2 + target_side
    # fp64 sums: in fp32 a response's summed log-probs drift from scoring it alone
    sums = torch.zeros(num_pairs * 2, dtype=torch.float64, device=token_logps.device)
    sums = sums.scatter_add(0, key, token_logps.double())
    counts = torch.bincount(key, minlength=num_pairs * 2)
    return sums.view(num_pairs, 2), counts.view(num_pairs, 2)


def batch_pair_logps(run, batch: dict[str, torch.Tensor], **extra) -> tuple[torch.Tensor, torch.Tensor]:
    """A preference micro-batch through ``run`` (the model's forward, ``output="target_logprobs"``):
    per-pair log-prob sums and response lengths, [P, 2] each."""
    token_logps = run(batch, output="target_logprobs", pred_index=batch["pred_index"],
                      target_ids=batch["target_ids"], **extra)
    return pair_logps(token_logps, batch["target_pair"], batch["target_side"], int(batch["pair_ids"].numel()))


@dataclass
class PairTerms:
    """Per-pair values [P] of one micro-batch."""

    preference: torch.Tensor
    quality: torch.Tensor
    generation: torch.Tensor
    reward_chosen: torch.Tensor
    reward_rejected: torch.Tensor


def mpo_terms(policy: torch.Tensor, reference: torch.Tensor, chosen_tokens: torch.Tensor, beta: float,
              delta: float) -> PairTerms:
    """The three MPO losses per pair. ``policy`` / ``reference``: [P, 2] log-prob sums (chosen,
    rejected); ``chosen_tokens`` [P]: |y_c|; ``delta``: the reward shift of this step."""
    policy = policy.double()  # fp64 sums (see pair_logps); the terms are [P]-sized
    rewards = beta * (policy - reference.to(policy))
    r_c, r_r = rewards[:, CHOSEN], rewards[:, REJECTED]
    return PairTerms(
        preference=-F.logsigmoid(r_c - r_r),
        quality=-F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta)),
        generation=-policy[:, CHOSEN] / chosen_tokens.clamp(min=1).to(policy),
        reward_chosen=r_c,
        reward_rejected=r_r,
    )


class RewardShift:
    """The BCO reward shift delta: held fixed while an optimizer step runs, then updated once from
    the sum and count of that step's rewards (chosen and rejected, every micro-batch and rank).

    - ``cumulative``: the mean of every reward seen so far (each reward counts once), the running
      mean of InternVL's MPO (which uses TRL's ``bco_pair`` loss). TRL's ``RunningMoments`` differs
      in two ways: it is updated with each micro-batch's *mean* reward (a micro-batch counts once
      whatever its size, and under several processes once per rank), and it is updated before the
      micro-batch's own loss uses it, so delta moves inside an optimizer step and depends on how the
      step is split. Here delta is the same for every pair of a step, so splitting changes nothing;
      with equal micro-batches the two means agree, one step later here.
    - ``ema``: ``delta <- m * delta + (1 - m) * mean(step rewards)``, starting from 0 (NeMo-RL's
      MPO: an exponential moving average synchronised once per optimizer step).
    - ``none``: delta stays 0.

    ``value`` and ``count`` are plain floats in the checkpoint's trainer state (json keeps a float
    exactly), so a resumed run continues bit for bit.
    """

    MODES = ("cumulative", "ema", "none")

    def __init__(self, mode: str = "cumulative", momentum: float = 0.99) -> None:
        if mode not in self.MODES:
            raise ValueError(f"reward shift mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode = mode
        self.momentum = float(momentum)
        self.value = 0.0  # delta
        self.count = 0  # rewards seen (cumulative) or updates made (ema)

    def update(self, reward_sum: float, n: int) -> None:
        if self.mode == "none" or n <= 0:
            return
        if self.mode == "cumulative":
            total = self.count + int(n)
            self.value = (self.value * self.count + float(reward_sum)) / total
            self.count = total
        else:
            self.value = self.momentum * self.value + (1.0 - self.momentum) * (float(reward_sum) / n)
            self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "value": self.value, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"the checkpoint's reward shift is {state['mode']!r}, this run's {self.mode!r}")
        self.value = float(state["value"])
        self.count = int(state["count"])
