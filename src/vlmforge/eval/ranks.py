"""Evaluation over torchrun ranks: which batches a rank runs, and the merge of every rank's outputs.

A task's requests are sorted by prompt length and cut into batches once, the same way on every
rank and for any number of ranks; batch b runs on rank ``b % world_size``. So every prompt is
computed in the same batch, with the same padding, as in a one-rank run, and the merged outputs
(scored afterwards in input order) are the one-rank results exactly. The merge sends JSON through
``all_gather`` of byte tensors (torch's object collectives would pickle).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch
import torch.distributed as tdist

from vlmforge import dist


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Request indices in batches of ``batch_size``, longest prompts first (ties in input order), so a
    batch pads little; the last batch holds the shortest prompts."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[a : a + batch_size] for a in range(0, len(order), batch_size)]


def rank_batches(batches: list[list[int]], rank: int | None = None, world_size: int | None = None) -> list[list[int]]:
    """This rank's share of the batches: batch b on rank b % world_size."""
    rank = dist.rank() if rank is None else rank
    world_size = dist.world_size() if world_size is None else world_size
    return batches[rank::world_size]


def _collective_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_json(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON-serialisable; floats round-trip exactly), in rank order; one rank: ``[obj]``."""
    if dist.world_size() == 1:
        return [json.loads(json.dumps(obj))]
    dev = _collective_device()
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(dev)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(dist.world_size())]
    tdist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.long, device=dev))
    width = max(int(s) for s in sizes)
    padded = torch.zeros(width, dtype=torch.uint8, device=dev)
    padded[: data.numel()] = data
    gathered = [torch.empty(width, dtype=torch.uint8, device=dev) for _ in sizes]
    tdist.all_gather(gathered, padded)
    return [json.loads(bytes(g[: int(n)].cpu().numpy()).decode()) for g, n in zip(gathered, sizes)]


def merge_outputs(mine: dict[int, Any]) -> dict[int, Any]:
    """Every rank's ``{request index: output}`` merged (the same dict on every rank)."""
    merged: dict[int, Any] = {}
    for part in all_gather_json({str(k): v for k, v in mine.items()}):
        merged.update({int(k): v for k, v in part.items()})
    return merged
