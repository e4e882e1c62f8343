"""Process-group helpers: rank information, gradient averaging of the trainable parameters, gathers.

Only trainable parameters (LoRA and flow model) are synchronised; the frozen UNet weights, VAE,
text encoder and reward model stay plain modules on every rank.  Gradients are averaged with one
all-reduce per parameter group after accumulation (DDP's semantics; DeepSpeed ZeRO is selected by
``distributed.backend=deepspeed``).
"""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the ``.grad`` of ``params`` across ranks, flattened into one buffer."""
    if not is_distributed():
        return
    grads: List[Tensor] = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def gather_tensor(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) along dim 0 across ranks."""
    if not is_distributed():
        return x
    out = [torch.zeros_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_objects(items: list) -> list:
    if not is_distributed():
        return list(items)
    out: list = [None] * world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
