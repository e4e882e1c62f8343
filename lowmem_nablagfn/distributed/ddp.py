"""``distributed.backend=ddp``: plain data-parallel gradient averaging with DDP's semantics."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from .collectives import average_gradients
from .sync import GradientSync


class DataParallel(GradientSync):
    """DDP semantics: per group, average the gradients over ranks, clip, then one optimiser step.

    Works for one process too (averaging is then a no-op), for any optimiser (8-bit included).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float, scaler=None):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler

    def step(self) -> Dict[str, float]:
        stats = {}
        for group in self.optimizer.param_groups:
            average_gradients(group["params"])  # fp16: already unscaled (memory.LossScaler.accumulate)
            if self.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(group["params"], self.max_grad_norm)
                stats[f"grad_norm/{group.get('name', 'params')}"] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            stats.update(self.scaler.stepped())
        return stats

    def trainable_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {g.get("name", f"group{i}"): list(g["params"]) for i, g in enumerate(self.optimizer.param_groups)}

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        extra = {"loss_scaler": self.scaler.state_dict()} if self.scaler is not None and self.scaler.enabled else {}
        return {"optimizer": self.optimizer.state_dict(), **extra}

    def load(self, state: dict, checkpoint: Path) -> None:
        if "optimizer" not in state:
            raise RuntimeError(f"checkpoint {checkpoint} keeps its optimiser state in DeepSpeed's partitions: "
                               f"resume it with distributed.backend=deepspeed")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
