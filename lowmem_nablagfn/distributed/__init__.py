"""Everything distributed, in one place: joining the process group, rank helpers, collectives, and
synchronising the trainable parameters (plain gradient averaging or DeepSpeed ZeRO).

Only the trainable parameters (LoRA and flow model) are synchronised; the frozen UNet weights, VAE,
text encoder and reward model stay plain modules on every rank.  Two synchronisers share one
interface (:class:`GradientSync`), chosen once by :func:`make_gradient_sync`:

``ddp`` (default) — :class:`DataParallel`: after the last accumulation batch, one all-reduce (mean)
per parameter group, then clipping per group and one optimiser step: DDP's semantics, every rank
holding the whole optimiser state.

``deepspeed`` — :class:`ZeroDataParallel`: one DeepSpeed engine per parameter group, each ZeRO
stage 1/2 partitioning its AdamW state (optionally offloaded to CPU memory), the gradients of an
update reduce-scattered once (see :mod:`.zero`).

Modules: :mod:`.group` (process group and its backends, the device of collectives, rank helpers),
:mod:`.collectives` (gathers, averages, a vote), :mod:`.sync` (the :class:`GradientSync` interface,
``SHARD_DIR``), :mod:`.ddp` (:class:`DataParallel`), :mod:`.zero` (:class:`ZeroDataParallel`,
``deepspeed_config``).
"""
from __future__ import annotations

import torch

from .collectives import (any_rank, average_gradients, broadcast_object, gather_objects,  # noqa: F401
                          gather_tensor, mean_over_ranks)
from .ddp import DataParallel
from .group import (BACKENDS, barrier, check_launcher, collective_device, free_port,  # noqa: F401
                    init_process_group, is_distributed, is_main, launched, pick_device, rank, world_size)
from .sync import SHARD_DIR, GradientSync
from .zero import ZeroDataParallel, deepspeed_config  # noqa: F401


def make_gradient_sync(dcfg, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                       micro_batch: int, scaler=None) -> GradientSync:
    """The synchroniser that ``distributed.backend`` names (``DistributedConfig``); ``scaler``: the
    fp16 ``memory.LossScaler`` (ddp only: config validation refuses fp16 with DeepSpeed)."""
    if dcfg.backend == "deepspeed":
        if scaler is not None and scaler.enabled:
            raise ValueError("fp16 loss scaling needs distributed.backend=ddp")
        return ZeroDataParallel(optimizer, dcfg.zero_stage, dcfg.offload_optimizer, max_grad_norm,
                                micro_batch)
    return DataParallel(optimizer, max_grad_norm, scaler)


__all__ = ["BACKENDS", "SHARD_DIR", "DataParallel", "GradientSync", "ZeroDataParallel", "any_rank",
           "average_gradients", "barrier", "broadcast_object", "check_launcher", "collective_device",
           "deepspeed_config", "free_port", "gather_objects", "gather_tensor", "init_process_group",
           "is_distributed", "is_main", "launched", "make_gradient_sync", "mean_over_ranks", "pick_device",
           "rank", "world_size"]
