"""torch.distributed glue: every rank ends with the moments of the union of all ranks' data.

Each rank packs its per-layer ``(count, mean, M2)`` into one float64 vector; one ``all_gather``
brings every rank's vector everywhere, and every rank merges them in rank order with Chan's merge.
The same numbers merged in the same order give bit-identical statistics on every rank, equal (to
float64 rounding) to one process over the union of the data. Works with any backend that supports
``all_gather`` on float64 (gloo, NCCL, MPI); NCCL tensors live on the current CUDA device.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .moments import Moments, merge

__all__ = ["is_distributed", "world", "any_rank_failed", "gather_moments", "sum_across_ranks"]

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True inside an initialized default process group with more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside torch.distributed."""
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank_failed(local_failed: bool) -> bool:
    """Agree across ranks whether any rank failed (so that no rank waits forever in a collective)."""
    if not is_distributed():
        return local_failed
    flag = torch.tensor([1.0 if local_failed else 0.0], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


def sum_across_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum of a few numbers over all ranks (float64)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def gather_moments(local: Sequence[Moments | None], channels: Sequence[int]) -> list[Moments | None]:
    """Merge each layer's moments over all ranks; ``local[i]`` is ``None`` where a rank saw nothing."""
    if not is_distributed():
        return list(local)
    rank, size = world()
    device = _comm_device()
    pieces = []
    for moments, c in zip(local, channels):
        if moments is None:
            pieces.append(torch.zeros(1 + 2 * c, dtype=torch.float64, device=device))
        else:
            count = torch.tensor([moments.count], dtype=torch.float64, device=device)
            pieces.append(torch.cat([count, moments.mean.to(device, torch.float64), moments.m2.to(device, torch.float64)]))
    flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(flat) for _ in range(size)]
    torch.distributed.all_gather(gathered, flat)
    log.debug("rank %d gathered %d float64 values from %d ranks", rank, flat.numel(), size)
    out: list[Moments | None] = []
    offset = 0
    for moments, c in zip(local, channels):
        parts = []
        for vector in gathered:
            block = vector[offset : offset + 1 + 2 * c].cpu()
            if block[0] > 0:
                parts.append(Moments(float(block[0]), block[1 : 1 + c].clone(), block[1 + c :].clone()))
        offset += 1 + 2 * c
        merged = merge(parts)
        if merged is not None and moments is not None:
            merged.mean = merged.mean.to(moments.mean.device)
            merged.m2 = merged.m2.to(moments.m2.device)
        out.append(merged)
    return out
