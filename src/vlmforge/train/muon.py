"""Muon: torch's optimizer with the Newton-Schulz iteration in fp32 off the GPU, run once per
group of same-shape matrices (a transformer has a few shapes, each repeated once per layer)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor


def _work_dtype(g: torch.Tensor) -> torch.dtype:
    # bf16 on GPUs as torch does; fp32 elsewhere: a CPU without bf16 matrix units emulates bf16,
    # at several times the fp32 cost
    return torch.bfloat16 if g.device.type == "cuda" else torch.float32


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (singular values of ``g`` pushed to ~1) on one matrix,
    or on a stack of same-shape matrices ``[G, rows, cols]`` (each normalised on its own)."""
    a, b, c = coefficients
    x = g.to(_work_dtype(g))
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    if x.dim() == 2:
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(g.dtype)


def orthogonalise_all(updates: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int,
                      eps: float) -> list[torch.Tensor]:
    """``orthogonalise`` of every matrix, same-shape plain tensors stacked into one batched
    iteration (fewer, larger matmuls); FSDP2's sharded DTensors go one by one, their ops
    gathering each whole matrix."""
    out: list[torch.Tensor | None] = [None] * len(updates)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, u in enumerate(updates):
        if isinstance(u, DTensor):
            out[i] = orthogonalise(u, coefficients, steps, eps)
        else:
            groups[(tuple(u.shape), u.dtype, u.device)].append(i)
    for index in groups.values():
        if len(index) == 1:
            out[index[0]] = orthogonalise(updates[index[0]], coefficients, steps, eps)
            continue
        done = orthogonalise(torch.stack([updates[i] for i in index]), coefficients, steps, eps)
        for k, i in enumerate(index):
            out[i] = done[k]
    return out  # type: ignore[return-value]


class Muon(torch.optim.Muon):
    """torch's Muon (its groups, state and checks) with ``orthogonalise_all`` as the iteration.
    The lr is scaled by sqrt(max(1, rows / cols)), torch's default ("original") adjustment."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, beta = float(group["lr"]), group["momentum"]
            updates = []
            for g, buf in zip(grads, bufs):
                buf.lerp_(g, 1 - beta)
                updates.append(g.lerp(buf, beta) if group["nesterov"] else buf)
            updates = orthogonalise_all(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
            for p, update in zip(params, updates):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
        return loss
