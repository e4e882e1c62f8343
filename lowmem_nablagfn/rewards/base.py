"""The reward interface: images in [0, 1] and prompts in, one float32 log-reward per image out."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class RewardModel(nn.Module):
    """A differentiable log-reward ``R``.

    ``forward(images, prompts)``: images (B, 3, H, W) float32 in [0, 1], prompts a list of B strings;
    returns (B,) float32, differentiable w.r.t. ``images``. Subclasses set ``prompt_free`` when the
    score ignores the prompt (e.g. the aesthetic score).
    """

    prompt_free: bool = True

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"reward expects images (B, 3, H, W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward got {images.shape[0]} images but {len(prompts)} prompts")
        # Reward math in float32 whatever the trainer's precision (bf16 reward math is inaccurate).
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.score(images.float(), list(prompts)).float()
