"""What finetuning adds to loaded parts: the frozen parts cast to their dtype, the LoRA adapter and
the flow model.  The trainer's set-up (real tensors) and the planner (meta tensors) build it with
this one function, so that the planner counts what trains."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..dtypes import to_dtype
from .flow import build_flow_model
from .lora import add_lora, freeze
from .parts import SDParts


@dataclass
class Trainable:
    """The LoRA parameters, the flow model ``g_φ`` (None in no-flow mode) and the latent shape (C, h, w)."""

    lora_params: List[nn.Parameter]
    flow_model: Optional[nn.Module]
    latent_shape: Tuple[int, int, int]


def prepare_for_training(cfg, parts: SDParts, device: Optional[torch.device] = None) -> Trainable:
    """Freeze the UNet, VAE and text encoders to ``training.mixed_precision`` (each part's own frozen
    dtype: SDXL's VAE is not cast to fp16) on ``device``, add ``model.lora`` to the UNet and build the
    flow model for ``sampling.resolution`` (on ``device``; None: where the tensors are made)."""
    frozen = to_dtype(cfg.training.mixed_precision)
    for module in (parts.unet, parts.vae, *parts.text_encoders):
        freeze(module, device, parts.frozen_dtype(module, frozen))
    lora = cfg.model.lora
    lora_params = add_lora(parts.unet, lora.rank, lora.target_modules, lora.init, cfg.seed)
    size = cfg.sampling.resolution // parts.vae_scale_factor
    latent_shape = (parts.unet.config.in_channels, size, size)
    flow = None
    if not cfg.model.no_flow:
        flow = build_flow_model(latent_shape[0], size, parts.prompt_embed_dim, list(cfg.model.flow_block_widths),
                                cfg.seed)
        flow = (flow if device is None else flow.to(device)).train()
    return Trainable(lora_params, flow, latent_shape)
