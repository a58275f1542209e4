"""AdamW parameter groups (one learning rate per component, no decay on biases and norms) and
the learning-rate schedule (linear warmup, then cosine / linear decay or constant)."""

from __future__ import annotations

import math
import torch
from torch import nn

COMPONENTS = ("vision", "projector", "llm")
# First attribute name of a parameter -> component (the VLM names its parts vision / projector / llm;
# the aliases cover the usual HF spellings).
_PREFIXES = {
    "vision": "vision",
    "vision_tower": "vision",
    "vision_model": "vision",
    "vision_encoder": "vision",
    "projector": "projector",
    "mm_projector": "projector",
    "multi_modal_projector": "projector",
    "llm": "llm",
    "language_model": "llm",
}


def component_of(param_name: str) -> str:
    head = param_name.split(".", 1)[0]
    try:
        return _PREFIXES[head]
    except KeyError:
        raise ValueError(
            f"parameter {param_name!r} belongs to no known component (expected a prefix in {sorted(_PREFIXES)})"
        ) from None


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and normalisation weights (1-D tensors) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def component_lrs(tcfg) -> dict[str, float]:
    return {
        "llm": float(tcfg.lr),
        "projector": float(tcfg.projector_lr if tcfg.projector_lr is not None else tcfg.lr),
        "vision": float(tcfg.vision_lr if tcfg.vision_lr is not None else tcfg.lr),
    }


def param_groups(model: nn.Module, tcfg) -> list[dict]:
    """Trainable parameters only (frozen ones stay out of the optimizer), grouped by
    (component, decay). Each group carries a ``name`` used for logging its lr."""
    lrs = component_lrs(tcfg)
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = bool(tcfg.no_decay_bias_and_norm) and is_no_decay(name, p)
        buckets.setdefault((component_of(name), no_decay), []).append(p)
    groups = []
    for comp in COMPONENTS:
        for no_decay in (False, True):
            params = buckets.get((comp, no_decay))
            if params:
                groups.append(
                    {
                        "params": params,
                        "name": f"{comp}{'_no_decay' if no_decay else ''}",
                        "component": comp,
                        "lr": lrs[comp],
                        "weight_decay": 0.0 if no_decay else float(tcfg.weight_decay),
                    }
                )
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (see train.trainable)")
    return groups


def build_optimizer(model: nn.Module, tcfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, tcfg),
        betas=(float(tcfg.adam_beta1), float(tcfg.adam_beta2)),
        eps=float(tcfg.adam_eps),
    )


def warmup_steps(tcfg, total_steps: int) -> int:
    if tcfg.warmup_steps > 0:
        return int(tcfg.warmup_steps)
    return int(math.ceil(float(tcfg.warmup_ratio) * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier on the base lr for optimizer step ``step`` (0-based): linear warmup from
    1/warmup to 1 (no step runs at lr 0), then decay towards ``min_ratio`` (reached one step
    after the last, so the last step still learns)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"lr_schedule must be cosine, linear or constant, got {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg, total_steps: int):
    """A LambdaLR (its state_dict is plain numbers, saved as json in checkpoints)."""
    warm = warmup_steps(tcfg, total_steps)
    schedule, min_ratio = str(tcfg.lr_schedule), float(tcfg.min_lr_ratio)
    lr_factor(0, total_steps, warm, schedule, min_ratio)  # validates the schedule name now

    def fn(step: int) -> float:
        return lr_factor(step, total_steps, warm, schedule, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """lr per component (decay / no-decay groups of one component share it)."""
    return {f"lr/{g['component']}": float(g["lr"]) for g in optimizer.param_groups}
