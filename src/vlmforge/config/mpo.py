"""MPO section (owned by vlmforge.train): InternVL's Mixed Preference Optimization.

loss = w_p * DPO-sigmoid + w_q * BCO (reward shift delta) + w_g * LM on the chosen response;
rewards r = beta * (log pi(y|x) - log pi_ref(y|x)), log-probs summed over response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlmforge.config.ranges import ranged


@dataclass
class MPOConfig:
    preference_weight: float = ranged(0.8, ge=0)  # w_p (DPO, sigmoid)
    quality_weight: float = ranged(0.2, ge=0)  # w_q (BCO with reward shift)
    generation_weight: float = ranged(1.0, ge=0)  # w_g (LM loss on the chosen response, per token)
    beta: float = ranged(0.1, gt=0)
    # The BCO reward shift delta, updated once per optimizer step from all micro-batches and ranks:
    # cumulative (running mean of every reward seen: InternVL / TRL), ema (momentum, NeMo-RL), none (0).
    reward_shift: Literal["cumulative", "ema", "none"] = "cumulative"
    reward_shift_momentum: float = ranged(0.99, ge=0, lt=1)  # ema only (NeMo-RL's default)
    # precompute: the initial model's log-probs over the preference data, once, stored in the run
    # folder (one model in memory); live: a frozen copy of the initial model next to the policy.
    reference: Literal["precompute", "live"] = "precompute"
