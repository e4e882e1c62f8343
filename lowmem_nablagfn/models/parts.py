"""What a Stable Diffusion model is to this package: :class:`SDParts` (UNet, VAE, text encoder(s),
tokenizer(s), scheduler config), the VAE's storage dtype rule, and the diffusers pipeline over the
parts (to save them as a model directory or to sample with diffusers)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn


def vae_dtype(vae_config, is_sdxl: bool, dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows in fp16 (NaN images), so under fp16 it is upcast to fp32 when its config
    says ``force_upcast`` (as diffusers' SDXL pipelines do); an fp16-fix VAE (``force_upcast: false``)
    stays fp16, and bf16 / fp32 are kept.  SD 1.x VAEs run in fp16 as they are."""
    if is_sdxl and dtype == torch.float16 and getattr(vae_config, "force_upcast", False):
        return torch.float32
    return dtype


@dataclass
class SDParts:
    """The parts of a Stable Diffusion model the trainer uses.

    SDXL has a second text encoder (OpenCLIP bigG, ``CLIPTextModelWithProjection``) and tokenizer;
    the UNet then takes added conditioning (pooled embedding and time ids), which
    :meth:`encode` / :meth:`uncond` return as a :class:`~lowmem_nablagfn.sampling.Conditioning`.
    """

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler_config: dict
    text_encoder_2: Optional[nn.Module] = None
    tokenizer_2: Optional[object] = None

    @property
    def denoiser(self) -> nn.Module:
        """The network the sampler calls and LoRA adapts: the UNet (SD 3: the transformer)."""
        return self.unet

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> List[nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    @property
    def prompt_embed_dim(self) -> int:
        """Width D of the prompt embeddings the UNet (and the flow model) attends to (SDXL: 2048)."""
        return sum(te.config.hidden_size for te in self.text_encoders)

    def frozen_dtype(self, module: nn.Module, dtype: torch.dtype) -> torch.dtype:
        """Storage dtype of a frozen part under ``training.mixed_precision`` (see :func:`vae_dtype`)."""
        return vae_dtype(self.vae.config, self.is_sdxl, dtype) if module is self.vae else dtype

    def encode(self, prompts: Sequence[str], device, resolution: int):
        """Prompt conditioning of ``prompts`` on ``device``: a (B, L, D) tensor (SD 1.x) or a
        ``Conditioning`` with pooled embeddings and time ids for ``resolution``-px images (SDXL)."""
        from ..sampling import encode_prompts, encode_prompts_sdxl

        if not self.is_sdxl:
            return encode_prompts(self.text_encoder, self.tokenizer, prompts, device)
        return encode_prompts_sdxl(self.text_encoders, [self.tokenizer, self.tokenizer_2], prompts, device,
                                   resolution)

    def uncond(self, device, resolution: int):
        """The unconditional (CFG) row: SD 1.x encodes the empty prompt; SDXL uses zero embeddings,
        as ``StableDiffusionXLPipeline`` does without a negative prompt (``force_zeros_for_empty_prompt``)."""
        c = self.encode([""], device, resolution)
        if not self.is_sdxl:
            return c
        return replace(c, prompt_embeds=torch.zeros_like(c.prompt_embeds),
                       pooled_embeds=torch.zeros_like(c.pooled_embeds))


def save_sd(parts: SDParts, path: str | Path) -> None:
    """Write the parts as a diffusers model directory (loadable by ``StableDiffusionPipeline`` or,
    for SDXL, ``StableDiffusionXLPipeline``)."""
    pipe = make_pipeline(parts)
    pipe.save_pretrained(str(path), safe_serialization=True)


def pipeline_class(parts: SDParts):
    """The diffusers pipeline class of the parts' family (also reads LoRA files for it)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if parts.is_sdxl else StableDiffusionPipeline


def make_pipeline(parts: SDParts):
    """A ``StableDiffusionPipeline`` (SDXL: ``StableDiffusionXLPipeline``, zero unconditional
    embeddings as SDXL base ships it) over the parts, DDIM scheduler, no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if parts.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
            scheduler=DDIMScheduler.from_config(parts.scheduler_config), force_zeros_for_empty_prompt=True,
            add_watermarker=False)
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)

