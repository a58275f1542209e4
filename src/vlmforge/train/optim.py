"""Optimizers and the learning-rate schedule.

- AdamW parameter groups: one learning rate per component, no decay on biases and norms.
- ``train.optimizer=muon``: Muon (``train.muon``) for the weight matrices inside
  the network, AdamW for embeddings, the output head, biases and norms (Muon's authors' split).
  The two are stepped as one (``OptimizerChain``), each with its own schedule (``SchedulerChain``).
- The schedule: linear warmup, then cosine / linear decay or constant.
- For a small stand-alone trainer (``curate train-filter``, ``vision-pretrain``): ``adamw_with_decay_split``
  (AdamW, one decay and one no-decay group) and ``warmup_cosine_scheduler``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from vlmforge.config.train import TrainConfig
from vlmforge.errors import ConfigError
from vlmforge.train.muon import Muon

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


def component_lrs(tcfg: TrainConfig) -> dict[str, float]:
    return {
        "llm": float(tcfg.lr),
        "projector": float(tcfg.projector_lr if tcfg.projector_lr is not None else tcfg.lr),
        "vision": float(tcfg.vision_lr if tcfg.vision_lr is not None else tcfg.lr),
    }


def embedding_tables(model: nn.Module) -> set[int]:
    """ids of the input embedding and output head weights (tied or not): Muon leaves them to AdamW."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        if hasattr(m, "get_output_embeddings") and callable(m.get_output_embeddings):
            head = m.get_output_embeddings()
            if head is not None:
                ids.add(id(head.weight))
    return ids


def muon_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The trainable weight matrices Muon updates: 2-D, not an embedding table or output head."""
    tables = embedding_tables(model)
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.ndim == 2 and id(p) not in tables]


def param_groups(model: nn.Module, tcfg: TrainConfig, exclude: set[int] = frozenset()) -> list[dict]:
    """Trainable parameters only (frozen ones stay out of the optimizer), grouped by
    (component, decay). Each group carries a ``name`` used for logging its lr. Parameters whose
    id is in ``exclude`` (Muon's) are left out."""
    lrs = component_lrs(tcfg)
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
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
    if not groups and not exclude:
        raise ValueError("nothing to train: every parameter is frozen (see train.trainable)")
    return groups


def muon_groups(model: nn.Module, tcfg: TrainConfig) -> list[dict]:
    """Muon's matrices, one group per component (each scaled like its AdamW lr: a component at
    half the LLM's lr gets half of train.muon_lr)."""
    lrs = component_lrs(tcfg)
    llm_lr = lrs["llm"] or 1.0
    by_comp: dict[str, list[torch.Tensor]] = {}
    for name, p in muon_params(model):
        by_comp.setdefault(component_of(name), []).append(p)
    return [
        {"params": by_comp[c], "name": f"{c}_muon", "component": c,
         "lr": float(tcfg.muon_lr) * lrs[c] / llm_lr, "weight_decay": float(tcfg.weight_decay)}
        for c in COMPONENTS if c in by_comp
    ]


class OptimizerChain:
    """Several torch optimizers over disjoint parameters, used as one: ``param_groups`` lists all
    groups, ``step`` / ``zero_grad`` reach each. ``optimizers`` is what distributed checkpointing
    (``get_state_dict``) takes."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


class SchedulerChain:
    """One LambdaLR per optimizer of an ``OptimizerChain``; ``get_last_lr`` follows ``param_groups``."""

    def __init__(self, schedulers: list):
        self.schedulers = list(schedulers)

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> list[float]:
        return [lr for s in self.schedulers for lr in s.get_last_lr()]

    def state_dict(self) -> dict:
        return {"chain": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.schedulers, state["chain"], strict=True):
            s.load_state_dict(st)


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind ``optimizer`` (a chain or a plain one)."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


def build_optimizer(model: nn.Module, tcfg: TrainConfig):
    """AdamW, or (``train.optimizer=muon``) an ``OptimizerChain`` of Muon and AdamW."""
    kind = str(tcfg.optimizer)
    adamw = lambda groups: torch.optim.AdamW(  # noqa: E731
        groups, betas=(float(tcfg.adam_beta1), float(tcfg.adam_beta2)), eps=float(tcfg.adam_eps))
    if kind == "adamw":
        return adamw(param_groups(model, tcfg))
    if kind != "muon":
        raise ConfigError(f"train.optimizer must be adamw or muon, got {kind!r}")
    matrices = muon_groups(model, tcfg)
    rest = param_groups(model, tcfg, exclude={id(p) for g in matrices for p in g["params"]})
    if not matrices and not rest:
        raise ValueError("nothing to train: every parameter is frozen (see train.trainable)")
    parts = []
    if matrices:
        parts.append(Muon(matrices, lr=float(tcfg.muon_lr), momentum=float(tcfg.muon_momentum),
                          weight_decay=float(tcfg.weight_decay)))
    if rest:
        parts.append(adamw(rest))
    return OptimizerChain(parts)


def warmup_steps(tcfg: TrainConfig, total_steps: int) -> int:
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


def build_scheduler(optimizer, tcfg: TrainConfig, total_steps: int):
    """A LambdaLR (its state_dict is plain numbers, saved as json in checkpoints); a
    ``SchedulerChain`` of them, same schedule, for an ``OptimizerChain``."""
    warm = warmup_steps(tcfg, total_steps)
    schedule, min_ratio = str(tcfg.lr_schedule), float(tcfg.min_lr_ratio)

    def fn(step: int) -> float:
        return lr_factor(step, total_steps, warm, schedule, min_ratio)

    if isinstance(optimizer, OptimizerChain):
        return SchedulerChain([torch.optim.lr_scheduler.LambdaLR(o, fn) for o in optimizer.optimizers])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def current_lrs(optimizer) -> dict[str, float]:
    """lr per component (decay / no-decay groups of one component share it; Muon's are logged
    apart, as lr/<component>_muon)."""
    return {f"lr/{g['name'].removesuffix('_no_decay')}": float(g["lr"]) for g in optimizer.param_groups}


def adamw_with_decay_split(
    named_params: Iterable[tuple[str, torch.Tensor]],
    lr: float,
    weight_decay: float,
    no_decay: Callable[[str, torch.Tensor], bool],
) -> torch.optim.AdamW:
    """AdamW with two groups, in this order: the parameters that decay, then those ``no_decay``
    picks (weight decay 0). Every parameter given is trained (filter frozen ones first)."""
    named = list(named_params)
    decay = [p for n, p in named if not no_decay(n, p)]
    rest = [p for n, p in named if no_decay(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


def warmup_cosine_factor(step: int, total_steps: int, warmup: int) -> float:
    """The small trainers' multiplier: a linear warmup over ``warmup`` steps times a cosine over
    the whole run (the cosine starts at step 0, not after the warmup as in ``lr_factor``)."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int):
    """LambdaLR of ``warmup_cosine_factor``, warming up over a twentieth of the run (>= 1 step)."""
    warm = max(1, total_steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, total_steps, warm))
