"""The interface every gradient synchroniser offers (:class:`GradientSync`) and where a checkpoint
keeps what each rank writes itself (:data:`SHARD_DIR`)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

SHARD_DIR = "shards"  # inside a checkpoint: what each rank writes itself (lowmem_nablagfn.checkpoint)


class GradientSync:
    """How the trainable parameters' gradients become one update; every rank calls every method.

    ``step()`` runs after the last accumulation batch of an update and returns statistics
    (``grad_norm/<group>``); ``state_dict()`` is merged into rank 0's training state;
    ``save_shards(dir)`` writes what every rank must write itself; ``load(state, checkpoint)``
    restores both.
    """

    optimizer: Optional[torch.optim.Optimizer] = None
    sharded = False
    scaler = None  # memory.LossScaler under fp16 (DataParallel only): its step() and state

    def step(self) -> Dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def trainable_groups(self) -> Dict[str, List[nn.Parameter]]:
        raise NotImplementedError

    def nonfinite_gradients(self) -> List[str]:
        """Groups whose accumulated local gradient holds inf or NaN (checked before any reduction)."""
        bad = []
        for name, params in self.trainable_groups().items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                bad.append(f"gradient of {name}")
        if self.scaler is not None and self.scaler.found_inf:
            bad.append("fp16 input gradient (reward or reverse score)")
        return bad

    def skip(self) -> None:
        """Drop the accumulated gradients without an optimiser step (every rank calls it together)."""
        raise NotImplementedError

    def save_shards(self, directory: Path) -> None:
        pass

    def load(self, state: dict, checkpoint: Path) -> None:
        pass

    def close(self) -> None:
        """Release hooks and buffers at the end of training."""
