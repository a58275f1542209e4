"""Training objectives of the one loop: next-token prediction and MPO.

An objective turns a step's micro-batches into losses in three phases, so that the gradient of a
step does not depend on how its batch is split into micro-batches or ranks:

1. ``step_stats(micro)``: local sums over all micro-batches of the step (the next-token weight sum
   W, the number of pairs P). The loop all-reduces them together with its own counters in ONE
   call, before any backward, and hands the global values to ``begin_step``.
2. ``micro_loss(run, batch, i)``: micro-batch ``i``'s share of the step's loss, divided by the
   global denominators (the loop multiplies it by the world size, because FSDP averages gradients
   over ranks), and detached local sums for the metrics.
3. ``end_step(sums, stats, applied)``: the step's metrics from the sums all-reduced over ranks (one
   call); state such as MPO's reward shift is updated here, once per optimizer step.

Every objective reads log p(target) through the model's ``output="target_logprobs"``: the LM head
runs only on the positions that predict a target, never on the whole [B, L, V] grid.

Next-token reductions (n = supervised tokens of the packed sample the token belongs to):
``token`` w = 1 (every token counts the same), ``sample`` w = 1/n (every sample counts the
same), ``square`` w = 1/sqrt(n) (InternVL's compromise); the loss is ``-sum(w * log p) / W``.
"""

from __future__ import annotations

from typing import Any, Callable, get_args

import torch
from torch import nn

from vlmforge.config.mpo import MPOConfig
from vlmforge.config.train import LossReduction, TrainConfig
from vlmforge.data.collate import IGNORE_INDEX
from vlmforge.train.mpo import CHOSEN, REJECTED, RewardShift, batch_pair_logps, mpo_terms
from vlmforge.train.parallel import Placement, autocast_context
from vlmforge.train.reference import LiveReference, PrecomputedReference, load_or_precompute

REDUCTIONS = get_args(LossReduction)  # train.loss_reduction's choices
# Batch keys the model's forward takes (the rest of a batch is for the objective).
MODEL_INPUTS = ("input_ids", "pixel_values", "position_ids", "seq_ids", "v2pe_delta", "branch_ids", "image_map")

Run = Callable[..., torch.Tensor]  # run(batch, **forward_kwargs) -> the model's output


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def forward_fn(model: nn.Module, place: Placement) -> Run:
    """``run(batch, **kw)``: the model on the batch's model inputs (plus ``kw``), under the
    placement's autocast."""

    def run(batch: dict[str, Any], **kw) -> torch.Tensor:
        with autocast_context(place):
            return model(**model_inputs(batch), **kw)

    return run


# ---------------------------------------------------------------- next-token


def token_weights(labels: torch.Tensor, seq_ids: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Float weights [B, L-1] for the shifted targets ``labels[:, 1:]`` (0 where unsupervised)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {reduction!r}")
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    if reduction == "token":
        return supervised.float()
    rows, length = targets.shape
    if seq_ids is None:  # unpacked rows: one sample per row
        sample = torch.zeros_like(targets)
    else:
        sample = seq_ids[:, 1:].clamp(min=0)  # the sample a target token belongs to
    per_row = int(sample.max().item()) + 1 if sample.numel() else 1
    key = torch.arange(rows, device=labels.device).unsqueeze(1) * per_row + sample
    counts = torch.zeros(rows * per_row, device=labels.device)
    counts.scatter_add_(0, key[supervised], torch.ones(int(supervised.sum()), device=labels.device))
    n = counts[key].clamp(min=1.0)
    w = 1.0 / n if reduction == "sample" else n.rsqrt()
    return torch.where(supervised, w, torch.zeros_like(w))


def target_positions(weights: torch.Tensor, row_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions r * L + c that predict a weighted target, the mask of those targets) for
    weights [B, L-1] over ``labels[:, 1:]`` (target (r, c) is predicted at position (r, c))."""
    active = weights > 0
    rows, cols = active.nonzero(as_tuple=True)
    return rows * row_length + cols, active


def next_token_loss_sum(run: Run, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t * CE_t = -sum_t w_t * log p(target_t)`` (fp32 scalar) through the model's
    ``target_logprobs`` output."""
    pred_index, active = target_positions(weights, batch["input_ids"].shape[1])
    logp = run(batch, output="target_logprobs", pred_index=pred_index, target_ids=batch["labels"][:, 1:][active])
    return -(logp * weights[active].to(logp.dtype)).sum()


class Objective:
    """The interface the loop drives (see the module docstring); the defaults do nothing."""

    name = "objective"
    counters: tuple[str, ...] = ()  # step stats the loop adds up into the run's counters

    def setup(self, model: nn.Module, tcfg: TrainConfig, device: torch.device, world_size: int) -> None:
        """Before the policy is placed (a live reference copies it here)."""

    def before_training(self, run: Run, model: nn.Module, run_dir, tcfg: TrainConfig, device: torch.device) -> None:
        """Collective; before the first step and before a resume loads a checkpoint, so ``model``
        still holds the initial weights."""

    def step_stats(self, micro: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        raise NotImplementedError

    def begin_step(self, stats: dict[str, float]) -> None:
        raise NotImplementedError

    def micro_loss(self, run: Run, batch: dict[str, torch.Tensor], index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def end_step(self, sums: dict[str, float], stats: dict[str, float], applied: bool) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class NextTokenObjective(Objective):
    """``sum_t w_t * CE_t / W`` over the step, W = the sum of all weights of the step over every
    micro-batch and rank (known up front), so each micro-batch contributes ``sum(w * CE) / W``."""

    name = "next_token"

    def __init__(self, reduction: str = "token") -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self._weights: list[torch.Tensor] = []
        self._total = 0.0

    def step_stats(self, micro):
        self._weights = [token_weights(b["labels"], b.get("seq_ids"), self.reduction) for b in micro]
        weight = sum(w.double().sum() for w in self._weights)
        return {"weight": weight, "supervised_tokens": sum(int((w > 0).sum()) for w in self._weights)}

    def begin_step(self, stats):
        self._total = float(stats["weight"])

    def micro_loss(self, run, batch, index):
        ce = next_token_loss_sum(run, batch, self._weights[index])
        scale = 1.0 / self._total if self._total > 0 else 0.0
        return ce * scale, {"weighted_ce": ce.detach()}

    def end_step(self, sums, stats, applied):
        total = float(stats["weight"])
        return {"loss": sums["weighted_ce"] / total if total > 0 else 0.0}


class VerdictObjective(NextTokenObjective):
    """Next-token prediction on a process reward model's verdicts (stage prm, where the only
    supervised tokens are the '+' / '-' replies): the same loss, plus ``verdict_accuracy``, the
    share of verdicts where argmax over {'+', '-'} is the label ('+' on a tie). The other verdict's
    log-prob is read in the same forward pass, at the same positions."""

    def __init__(self, reduction: str, plus: int, minus: int) -> None:
        super().__init__(reduction)
        self.plus, self.minus = int(plus), int(minus)

    def micro_loss(self, run, batch, index):
        weights = self._weights[index]
        pred_index, active = target_positions(weights, batch["input_ids"].shape[1])
        targets = batch["labels"][:, 1:][active]
        other = torch.where(targets == self.plus, torch.full_like(targets, self.minus), torch.full_like(targets, self.plus))
        logp = run(batch, output="target_logprobs", pred_index=torch.cat([pred_index, pred_index]),
                   target_ids=torch.cat([targets, other]))
        n = targets.numel()
        label, rival = logp[:n], logp[n:]
        ce = -(label * weights[active].to(label.dtype)).sum()
        says_plus = torch.where(targets == self.plus, label >= rival, rival >= label)
        correct = (says_plus == (targets == self.plus)).sum()
        scale = 1.0 / self._total if self._total > 0 else 0.0
        return ce * scale, {"weighted_ce": ce.detach(), "verdicts_correct": correct.detach(),
                            "verdicts": torch.tensor(float(n), device=ce.device)}

    def end_step(self, sums, stats, applied):
        row = super().end_step(sums, stats, applied)
        n = sums["verdicts"]
        row["verdict_accuracy"] = sums["verdicts_correct"] / n if n > 0 else 0.0
        return row


# ---------------------------------------------------------------- MPO


class MPOObjective(Objective):
    """InternVL's MPO on preference micro-batches (see :mod:`vlmforge.train.mpo`): each loss term
    is a sum over pairs divided by P, the number of pairs of the whole step (all micro-batches and
    ranks); the reward shift is fixed during the step and updated after it from the step's rewards.

    ``loader``: the preference loader (``reference_batches`` / ``num_pairs`` for precompute).
    ``reference_key``: what precomputed log-probs are keyed by (see ``reference.load_or_precompute``).
    ``v2pe_delta``: passed to policy and reference alike, so both see the same positions (V2PE would
    otherwise draw a random delta in training mode and only the reward would feel it).
    """

    name = "mpo"
    counters = ("pairs",)
    SUMS = ("preference", "quality", "generation", "reward_chosen", "reward_rejected", "correct",
            "logp_chosen", "logp_rejected")

    def __init__(self, cfg: MPOConfig, loader=None, reference_key: dict[str, Any] | None = None,
                 v2pe_delta: float | None = None, reference_batch_size: int = 1, progress: bool = True,
                 part_pairs: int | None = None) -> None:
        self.cfg = cfg
        self.beta = float(cfg.beta)
        self.weights = (float(cfg.preference_weight), float(cfg.quality_weight), float(cfg.generation_weight))
        self.mode = str(cfg.reference)
        if self.mode not in ("precompute", "live"):
            raise ValueError(f"mpo.reference must be precompute or live, got {self.mode!r}")
        self.shift = RewardShift(str(cfg.reward_shift), float(cfg.reward_shift_momentum))
        self.loader = loader
        self.reference_key = reference_key or {}
        self.v2pe_delta = v2pe_delta
        self.reference_batch_size = int(reference_batch_size)
        self.progress = progress
        self.part_pairs = part_pairs
        self.reference: PrecomputedReference | None = None
        self.live: LiveReference | None = None
        self._live_run: Run | None = None
        self._pairs = 0.0
        self._delta = 0.0

    # -- reference
    def setup(self, model, tcfg, device, world_size):
        if self.mode == "live":
            self.live = LiveReference(model, tcfg, device, world_size)
            self._live_run = forward_fn(self.live.model, self.live.place)

    def _extra(self, batch) -> dict[str, Any]:
        return {} if self.v2pe_delta is None or "v2pe_delta" in batch else {"v2pe_delta": self.v2pe_delta}

    def before_training(self, run, model, run_dir, tcfg, device):
        if self.mode != "precompute" or self.reference is not None:  # live, or a reference handed in
            return
        if self.loader is None:
            raise ValueError("mpo.reference=precompute needs the preference loader")

        def initial_logps(batch):
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            return batch_pair_logps(run, batch, **self._extra(batch))[0]

        was_training = model.training
        model.eval()
        try:
            kw = {"part_pairs": self.part_pairs} if self.part_pairs else {}
            self.reference = load_or_precompute(run_dir, self.reference_key, self.loader, self.reference_batch_size,
                                                initial_logps, device, progress=self.progress, **kw)
        finally:
            model.train(was_training)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.live is not None:
            with torch.no_grad():
                return batch_pair_logps(self._live_run, batch, **self._extra(batch))[0]
        if self.reference is None:
            raise RuntimeError("no reference log-probs: before_training did not run")
        return self.reference.pair_logps(batch)

    # -- the step
    def step_stats(self, micro):
        return {"pairs": sum(int(b["pair_ids"].numel()) for b in micro),
                "supervised_tokens": sum(int(b["target_ids"].numel()) for b in micro)}

    def begin_step(self, stats):
        self._pairs = float(stats["pairs"])
        self._delta = self.shift.value  # fixed for the whole step

    def micro_loss(self, run, batch, index):
        policy, counts = batch_pair_logps(run, batch, **self._extra(batch))
        reference = self.reference_logps(batch).detach()
        t = mpo_terms(policy, reference, counts[:, CHOSEN], self.beta, self._delta)
        w_p, w_q, w_g = self.weights
        per_pair = w_p * t.preference + w_q * t.quality + w_g * t.generation
        loss = per_pair.sum() * (1.0 / self._pairs if self._pairs > 0 else 0.0)
        sums = {
            "preference": t.preference.sum(), "quality": t.quality.sum(), "generation": t.generation.sum(),
            "reward_chosen": t.reward_chosen.sum(), "reward_rejected": t.reward_rejected.sum(),
            "correct": (t.reward_chosen > t.reward_rejected).sum(),
            "logp_chosen": policy[:, CHOSEN].sum(), "logp_rejected": policy[:, REJECTED].sum(),
        }
        return loss, {k: v.detach() for k, v in sums.items()}

    def end_step(self, sums, stats, applied):
        n = float(stats["pairs"])
        mean = {k: (sums[k] / n if n > 0 else 0.0) for k in self.SUMS}
        w_p, w_q, w_g = self.weights
        row = {
            "loss": w_p * mean["preference"] + w_q * mean["quality"] + w_g * mean["generation"],
            "loss/preference": mean["preference"],
            "loss/quality": mean["quality"],
            "loss/generation": mean["generation"],
            "rewards/chosen": mean["reward_chosen"],
            "rewards/rejected": mean["reward_rejected"],
            "rewards/margin": mean["reward_chosen"] - mean["reward_rejected"],
            "rewards/accuracy": mean["correct"],
            "logps/chosen": mean["logp_chosen"],
            "logps/rejected": mean["logp_rejected"],
            "reward_shift": self._delta,  # the delta this step used
            "pairs": int(n),
        }
        if applied:  # a step without an update (non-finite) teaches the shift nothing either
            self.shift.update(sums["reward_chosen"] + sums["reward_rejected"], int(2 * n))
        return row

    def state_dict(self):
        return {"reward_shift": self.shift.state_dict()}

    def load_state_dict(self, state):
        if "reward_shift" in state:
            self.shift.load_state_dict(state["reward_shift"])


def build_objective(tcfg: TrainConfig) -> Objective:
    """The objective a train section names, when it needs nothing but the section (next-token)."""
    if str(tcfg.objective) == "next_token":
        return NextTokenObjective(str(tcfg.loss_reduction))
    raise ValueError(f"train.objective={tcfg.objective} is built by its stage (vlmforge.train.stages), not from "
                     "the train section alone")
