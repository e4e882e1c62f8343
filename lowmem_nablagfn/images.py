"""From latents to pictures: the VAE decode every consumer of images uses (the reward, sample
grids, evaluation, the planner's trace) and the PNG grids written for people to look at."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn


def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Images of SD latents: (N, C, h, w) -> (N, 3, H, W) float32 in [0, 1].

    The latents are unscaled by the VAE's ``scaling_factor`` (and shifted back by its ``shift_factor``
    when it has one: SD 3's VAE, ``latents / 1.5305 + 0.0609``, as ``StableDiffusion3Pipeline`` decodes)
    and decoded in the VAE's storage dtype; the images are cast to float32 (what the reward models
    compute in) before the [-1, 1] -> [0, 1] map.
    """
    x = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    x = (x + shift if shift else x).to(next(vae.parameters()).dtype)
    return (vae.decode(x).sample.float() / 2 + 0.5).clamp(0, 1)


def save_grid(images: Tensor, path: Path, min_side: int = 128) -> None:
    """A square-ish grid PNG; images smaller than ``min_side`` px are enlarged by an integer factor
    (nearest neighbour: pixels stay pixels) so that a 64-px sample can be looked at."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.float().cpu()
    factor = -(-min_side // max(images.shape[-2:]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    save_image(images, str(path), nrow=max(1, int(math.ceil(math.sqrt(images.shape[0])))))
