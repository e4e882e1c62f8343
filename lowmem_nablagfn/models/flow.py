"""The residual log-flow model ``g_φ(x, t, c)`` (its output is the gradient field ∇_x log F̃_t)."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..config import norm_groups


def build_flow_model(latent_channels: int, latent_size: int, cross_attention_dim: int,
                     block_widths: List[int], seed: int = 0) -> nn.Module:
    """Residual log-flow score model ``g_φ(x, t, c)``: a small UNet2DConditionModel whose output
    (the gradient field ∇_x log F̃_t) has a zero-initialised bias, 1 layer per block."""
    from diffusers import UNet2DConditionModel

    n = len(block_widths)  # widths that GroupNorm cannot divide: validate() refuses them (block_widths_problem)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",) if n > 1 else ("CrossAttnDownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1) if n > 1 else ("CrossAttnUpBlock2D",)
    groups = norm_groups(block_widths)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = UNet2DConditionModel(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            layers_per_block=1, block_out_channels=tuple(block_widths), down_block_types=down,
            up_block_types=up, cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
            attention_head_dim=max(1, min(8, block_widths[0] // 8)))
    nn.init.zeros_(model.conv_out.bias)
    return model.float()
