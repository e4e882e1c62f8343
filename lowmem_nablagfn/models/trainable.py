"""What finetuning adds to loaded parts: the frozen parts cast to their dtype, the LoRA adapter on the
denoiser (the UNet; SD 3.x: the transformer) and the flow model.  The trainer's set-up (real tensors)
and the planner (meta tensors) build it with this one function, so that the planner counts what trains."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..dtypes import to_dtype
from .family import family_of, lora_targets
from .flow import build_flow_model
from .lora import add_lora, freeze
from .parts import SDParts


@dataclass
class Trainable:
    """The LoRA parameters, the flow model ``g_φ`` (None in no-flow mode) and the latent shape (C, h, w)."""

    lora_params: List[nn.Parameter]
    flow_model: Optional[nn.Module]
    latent_shape: Tuple[int, int, int]


def freeze_parts(cfg, parts: SDParts, device: Optional[torch.device] = None) -> Tuple[int, int, int]:
    """Freeze the denoiser, VAE and text encoders to ``training.mixed_precision`` (each part's own frozen
    dtype: SDXL's VAE is not cast to fp16) on ``device``; returns the latent shape (C, h, w) of
    ``sampling.resolution`` (a size the model cannot take is refused first).  Training
    (:func:`prepare_for_training`), evaluation and the planner's meta build all start here."""
    family = family_of(parts)
    problem = family.resolution_problem(parts, cfg.sampling.resolution)
    if problem is not None:
        raise ValueError(problem)
    frozen = to_dtype(cfg.training.mixed_precision)
    for module in (parts.denoiser, parts.vae, *parts.text_encoders):
        freeze(module, device, parts.frozen_dtype(module, frozen))
    return family.latent_shape(parts, cfg.sampling.resolution)


def prepare_for_training(cfg, parts: SDParts, device: Optional[torch.device] = None) -> Trainable:
    """:func:`freeze_parts`, then add ``model.lora`` to the denoiser (its family's default layers unless
    set: :func:`~.family.lora_targets`) and build the flow model for ``sampling.resolution`` (on
    ``device``; None: where the tensors are made)."""
    latent_shape = freeze_parts(cfg, parts, device)
    size = latent_shape[1]
    lora = cfg.model.lora
    targets = lora_targets(family_of(parts), lora.target_modules)
    lora_params = add_lora(parts.denoiser, lora.rank, targets, lora.init, cfg.seed)
    flow = None
    if not cfg.model.no_flow:
        flow = build_flow_model(latent_shape[0], size, parts.prompt_embed_dim, list(cfg.model.flow_block_widths),
                                cfg.seed)
        flow = (flow if device is None else flow.to(device)).train()
    return Trainable(lora_params, flow, latent_shape)
