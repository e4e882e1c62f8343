"""Collectives over the job's ranks: gradient averaging, gathers, a broadcast, metric means, a vote.

Each is the identity in a single process, and every rank must call it together.  Every tensor a
collective sends is on :func:`.group.collective_device` (a CPU tensor on a group of NCCL alone would
raise "No backend type associated with device type cpu"); the object collectives serialise on the
device PyTorch picks for the group (the CPU on the groups this package makes).
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
import torch.distributed as dist
from torch import Tensor

from .group import collective_device, is_distributed, world_size


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the ``.grad`` of ``params`` across ranks, flattened into one buffer."""
    if not is_distributed():
        return
    grads: List[Tensor] = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = flat.to(collective_device(flat))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))  # back to the gradient's own device
        offset += n


def gather_tensor(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) along dim 0 across ranks."""
    if not is_distributed():
        return x
    sent = x.to(collective_device(x)).contiguous()
    out = [torch.zeros_like(sent) for _ in range(world_size())]
    dist.all_gather(out, sent)
    return torch.cat(out).to(x.device)


def gather_objects(items: list) -> list:
    """Every rank's ``items`` concatenated in rank order (picklable objects)."""
    if not is_distributed():
        return list(items)
    out: list = [None] * world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(metrics: Dict[str, float]) -> Dict[str, float]:
    """Average scalar metrics (same keys on every rank) across ranks: one all-reduce."""
    if not is_distributed() or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: v / world_size() for k, v in zip(keys, values.tolist())}


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so that all ranks take the same branch)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([float(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
