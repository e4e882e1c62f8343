"""Differentiable image preprocessing of the reward models, in torch.

Each reward model was trained on PIL images resized with bicubic resampling.  ``F.interpolate``
with ``mode="bicubic", antialias=True`` uses PIL's kernel (a = -0.5, widened when downsampling),
so it reproduces the training-time resize up to PIL's 8-bit rounding and clamping (which would
kill gradients and are left out; bicubic overshoot stays unclamped).  Without ``antialias`` torch
uses a = -0.75 and no low-pass filter: the official ∇-GFlowNet aesthetic reward does that
(``F.interpolate(..., (224, 224), mode="bicubic")``), and so does our aesthetic reward by default
(``aesthetic.ANTIALIAS``; ``reward.antialias`` overrides any reward's choice).

| reward | fit | size | mean / std |
| --- | --- | --- | --- |
| aesthetic (CLIP ViT-L/14, transformers' CLIPImageProcessor) | shortest side -> 224, centre crop | 224 | OpenAI CLIP |
| HPSv2 (open_clip ``image_transform(resize_longest_max=True)``) | longest side -> 224, pad with 0 | 224 | OpenAI CLIP |
| ImageReward (``Resize(224, BICUBIC)``, ``CenterCrop(224)``) | shortest side -> 224, centre crop | 224 | OpenAI CLIP |
| PickScore, CLIPScore (transformers' CLIPImageProcessor) | shortest side -> 224, centre crop | 224 | OpenAI CLIP |

For square generated images every fit is the same bicubic resize.  The math runs in the
input's floating dtype (float32 from :class:`~lowmem_nablagfn.rewards.base.RewardModel`, float64
in the finite-difference test).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FITS = ("crop", "pad", "stretch")


def resize(images: Tensor, size: Tuple[int, int], antialias: bool = True) -> Tensor:
    """Bicubic resize of (B, C, H, W) to ``size`` = (h, w); identity when the size already matches."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=antialias)


def resize_shortest_side(images: Tensor, size: int, antialias: bool = True) -> Tensor:
    """Shortest side to ``size``, aspect ratio kept (torchvision ``Resize(int)`` rounding)."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    return resize(images, (new_short, new_long) if h <= w else (new_long, new_short), antialias)


def center_crop(images: Tensor, size: int) -> Tensor:
    """Centre crop to ``size`` x ``size`` (torchvision ``CenterCrop`` offsets)."""
    h, w = images.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def resize_longest_side_and_pad(images: Tensor, size: int, fill: float = 0.0,
                                antialias: bool = True) -> Tensor:
    """Longest side to ``size``, then pad to a square with ``fill`` (open_clip ``ResizeMaxSize``)."""
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    images = resize(images, (new_h, new_w), antialias)
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    return images


def normalize(images: Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass
class ImageTransform:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalised model input, differentiable.

    Attributes:
        size: side of the model input in pixels.
        fit: ``crop`` (shortest side to ``size``, centre crop), ``pad`` (longest side to ``size``,
            pad with ``fill`` before normalisation) or ``stretch`` (both sides to ``size``).
        mean, std: per-channel normalisation.
        antialias: PIL-like bicubic (True, as the models were trained) or plain torch bicubic.
        fill: padding value in [0, 1] units (``pad`` only).
    """

    size: int = 224
    fit: str = "crop"
    mean: Tuple[float, ...] = CLIP_MEAN
    std: Tuple[float, ...] = CLIP_STD
    antialias: bool = True
    fill: float = 0.0

    def __post_init__(self):
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")

    def __call__(self, images: Tensor) -> Tensor:
        if self.fit == "crop":
            images = center_crop(resize_shortest_side(images, self.size, self.antialias), self.size)
        elif self.fit == "pad":
            images = resize_longest_side_and_pad(images, self.size, self.fill, self.antialias)
        else:
            images = resize(images, (self.size, self.size), self.antialias)
        return normalize(images, self.mean, self.std)


__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageTransform", "center_crop", "normalize", "resize",
           "resize_longest_side_and_pad", "resize_shortest_side"]
