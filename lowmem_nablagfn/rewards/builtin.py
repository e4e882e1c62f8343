"""Built-in differentiable rewards that need no weights: for offline runs and tests.

Each is a smooth function of the image whose improvement is visible in a sample grid:

* ``redness``: mean of ``r - (g + b) / 2``, in [-1, 1];
* ``blueness``: mean of ``b - (r + g) / 2``, in [-1, 1] — falls as redness is trained up: the tests'
  reward-hacking monitor (``monitor.rewards=[builtin:blueness]``) watches it;
* ``brightness``: mean luminance (Rec. 601), in [0, 1];
* ``saturation``: mean of ``max(r, g, b) - min(r, g, b)`` smoothed by a log-sum-exp, in [0, 1].
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import RewardModel


class RednessReward(RewardModel):
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        r, g, b = images.unbind(1)
        return (r - 0.5 * (g + b)).flatten(1).mean(1)


class BluenessReward(RewardModel):
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        r, g, b = images.unbind(1)
        return (b - 0.5 * (r + g)).flatten(1).mean(1)


class BrightnessReward(RewardModel):
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        r, g, b = images.unbind(1)
        return (0.299 * r + 0.587 * g + 0.114 * b).flatten(1).mean(1)


class SaturationReward(RewardModel):
    sharpness = 20.0

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        k = self.sharpness
        hi = torch.logsumexp(k * images, dim=1) / k
        lo = -torch.logsumexp(-k * images, dim=1) / k
        return (hi - lo).flatten(1).mean(1)


BUILTIN = {"builtin:redness": RednessReward, "builtin:blueness": BluenessReward,
           "builtin:brightness": BrightnessReward, "builtin:saturation": SaturationReward}
