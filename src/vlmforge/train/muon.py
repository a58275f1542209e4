"""Muon: torch's optimizer with the Newton-Schulz iteration in fp32 off the GPU."""

from __future__ import annotations

import torch


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (singular values of ``g`` pushed to ~1), in bf16 on
    GPUs as torch does, in fp32 elsewhere: a CPU without bf16 matrix units emulates bf16, at
    several times the fp32 cost."""
    a, b, c = coefficients
    x = g.to(torch.bfloat16 if g.device.type == "cuda" else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Muon):
    """torch's Muon (its groups, state and checks) with ``orthogonalise`` as the iteration.
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
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - beta)
                update = g.lerp(buf, beta) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
        return loss
