"""The model-family adapter: what the training loop needs to know about a UNet model (SD 1.x, SDXL)
and an MMDiT one (SD 3.x), said once, so that sampling, the objective and the memory plan stay one
house (issue #26: "a model family is a small adapter, not a fork of the loop").

================  ==========================================  ==============================================
                  UNet (SD 1.x / SDXL)                        SD 3.x (MMDiT)
================  ==========================================  ==============================================
conditioning      (B, 77, 768) / ``Conditioning`` (B, 77,     ``Conditioning(prompt_embeds (B, 77 + T, 4096),
                  2048) + pooled (B, 1280) + time ids (B, 6)  pooled_embeds (B, 2048))``, no time ids
CFG row           "" encoded (SD 1.x); zeros (SDXL)           "" through all three encoders
denoiser call     ``unet(x, t, encoder_hidden_states,         ``transformer(hidden_states=x, timestep=t,
                  added_cond_kwargs)``                        encoder_hidden_states, pooled_projections)``
output, sampler   ε or v (``ddim``, ``dpm-solver``)            velocity ε - x0 (``flow-sde``; ``as_epsilon``
                                                              passes it through)
timesteps         integer DDPM t                              float ``1000 t`` (the schedule's)
latents           4 channels, 1/8 of the pixels               16 channels, 1/8, even (patch 2)
VAE decode        latents / scaling_factor                    latents / 1.5305 + 0.0609 (``decode_latents``)
LoRA targets      to_q, to_k, to_v, to_out.0                  :data:`~.sd3_lora.SD3_LORA_TARGETS`
LoRA file         ``unet.…`` (``save_lora``)                  ``transformer.…`` (:func:`~.sd3_lora.save_sd3_lora`)
text encoders     resident or offloaded                       none while training: :func:`prompt_table`
================  ==========================================  ==============================================

The flow model ``g_φ`` is family-blind: a small UNet on ``latent_shape`` attending to the prompt
states (SD 3: 16 channels, (B, 77 + T, 4096)).  :func:`cfg_model_fn` is the one guided call of every
family (``sampling.cfg_eps_fn`` is the UNet's); :func:`load_run_parts` loads a run's parts, the SD 3
prompt table first; :func:`family_of` tells the family of loaded parts or of the denoiser alone (the
checkpoint code sees only the adapted module).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .sd3 import MODEL_PARTS, TEXT_PARTS, SD3Parts, TextOptions
from .sd3_lora import SD3_LORA_TARGETS, sd3_lora_state_dict, write_sd3_lora


class UNetFamily:
    """SD 1.x and SDXL: a ``UNet2DConditionModel`` predicting ε or v."""

    name = "unet"
    lora_targets: Tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_prefix = "unet"  # of the keys in diffusers' LoRA file (checkpoint.save_lora)

    @staticmethod
    def forward(denoiser: nn.Module, x: Tensor, t: Tensor, cond, dtype: torch.dtype) -> Tensor:
        from ..sampling import unet_forward

        return unet_forward(denoiser, x, t, cond, dtype)

    @staticmethod
    def latent_shape(parts, resolution: int) -> Tuple[int, int, int]:
        side = resolution // parts.vae_scale_factor
        return parts.unet.config.in_channels, side, side

    @staticmethod
    def resolution_problem(parts, resolution: int) -> Optional[str]:
        return None  # the UNet's own checks (config validation) apply

    @staticmethod
    def lora_state(unet: nn.Module) -> Dict[str, Tensor]:
        """The adapter's weights as diffusers' SD 1.x / SDXL LoRA file names them, without the ``unet.`` prefix."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))

    @staticmethod
    def write_lora(state: Dict[str, Tensor], directory) -> None:
        """``pytorch_lora_weights.safetensors``, what ``StableDiffusion(XL)Pipeline.load_lora_weights`` reads."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=state, safe_serialization=True)

    @staticmethod
    def read_lora(parts, state: Dict[str, Tensor]) -> tuple:
        """``(state, network_alphas)`` for ``load_lora_adapter`` of a diffusers or kohya LoRA file's tensors."""
        from .parts import pipeline_class

        kw = {"unet_config": parts.unet.config} if parts.is_sdxl else {}  # kohya files name SDXL's SGM blocks
        return pipeline_class(parts).lora_state_dict(state, **kw)


class SD3Family:
    """SD 3.x: an ``SD3Transformer2DModel`` predicting the flow velocity."""

    name = "sd3"
    lora_targets: Tuple[str, ...] = SD3_LORA_TARGETS
    lora_prefix = "transformer"  # sd3_lora.save_sd3_lora

    @staticmethod
    def forward(denoiser: nn.Module, x: Tensor, t: Tensor, cond, dtype: torch.dtype) -> Tensor:
        return denoiser(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=cond.prompt_embeds.to(dtype),
                        pooled_projections=cond.pooled_embeds.to(dtype)).sample

    @staticmethod
    def latent_shape(parts: SD3Parts, resolution: int) -> Tuple[int, int, int]:
        side = resolution // parts.vae_scale_factor
        return parts.transformer_config["in_channels"], side, side

    @staticmethod
    def resolution_problem(parts: SD3Parts, resolution: int) -> Optional[str]:
        """Why the transformer cannot take ``resolution``-px images: the latent side must be a multiple
        of the patch size and its patches fit the position table (SD 3.5 Medium: 16 px to 6144 px)."""
        cfg, scale = parts.transformer_config, parts.vae_scale_factor
        step, largest = scale * cfg["patch_size"], scale * cfg["patch_size"] * cfg["pos_embed_max_size"]
        if resolution % step or not step <= resolution <= largest:
            return (f"sampling.resolution={resolution}: this SD 3 model takes multiples of {step} px (VAE /{scale}, "
                    f"patch {cfg['patch_size']}) up to {largest} px (its position table); e.g. 1024")
        return None

    lora_state = staticmethod(sd3_lora_state_dict)
    write_lora = staticmethod(write_sd3_lora)

    @staticmethod
    def read_lora(parts, state: Dict[str, Tensor]) -> tuple:
        """``(state, None)`` for ``load_lora_adapter`` of diffusers' SD 3 LoRA file (no α: scale 1)."""
        from diffusers import StableDiffusion3Pipeline

        if any(k.startswith("lora_transformer_") for k in state):
            raise ValueError("a kohya-style SD 3 LoRA (lora_transformer_* keys, `export --format kohya`): evaluate the "
                             "diffusers file it was exported from (the run's lora/pytorch_lora_weights.safetensors)")
        return StableDiffusion3Pipeline.lora_state_dict(state), None


def family_of(parts_or_denoiser):
    """The adapter of loaded parts or of their denoiser alone (:class:`SD3Family` for
    :class:`~.sd3.SD3Parts` and ``SD3Transformer2DModel``, else :class:`UNetFamily`)."""
    from diffusers import SD3Transformer2DModel

    return SD3Family if isinstance(parts_or_denoiser, (SD3Parts, SD3Transformer2DModel)) else UNetFamily


def lora_targets(family, configured: Sequence[str]) -> List[str]:
    """The layers LoRA adapts: ``model.lora.target_modules``, where its default (the UNet's four attention
    projections, :attr:`UNetFamily.lora_targets`) stands for the family's own."""
    return list(family.lora_targets if tuple(configured) == UNetFamily.lora_targets else configured)


def cfg_model_fn(family, denoiser: nn.Module, uncond, guidance_scale: float):
    """The family's guided call (:func:`~lowmem_nablagfn.sampling.cfg_model_fn` with ``family.forward``)."""
    from ..sampling import cfg_model_fn as guided

    return guided(family.forward, denoiser, uncond, guidance_scale)


def prompt_table(model: str, revision: Optional[str], seed: int, text_options: TextOptions, prompts: Sequence[str],
                 label: str, device=None, dtype: torch.dtype = torch.float32, cache_dir: Optional[Path] = None):
    """SD 3 conditioning of a prompt set from the cache (:mod:`.prompt_cache`); on a miss the three
    text encoders alone are loaded (``dtype``, on ``device``), encode, and are released before this
    returns — load the transformer and VAE after it (``load_sd(…, components=MODEL_PARTS)``).

    Returns a :class:`~.prompt_cache.PromptEmbeddings`: ``encode(prompts, device)`` for batches,
    ``uncond`` for the CFG row."""
    from .lora import freeze
    from .loading import load_sd
    from .prompt_cache import model_identity, prompt_embeddings

    def make_encoder() -> SD3Parts:
        parts = load_sd(model, revision, seed, text_options=text_options, components=TEXT_PARTS)
        for encoder in parts.text_encoders:
            freeze(encoder, device, dtype)
        return parts

    options = {"max_sequence_length": text_options.max_sequence_length, "t5": text_options.t5,
               "dtype": str(dtype).replace("torch.", "")}
    return prompt_embeddings(prompts, model_identity(model, revision, seed), options, make_encoder, device,
                             label=label, cache_dir=cache_dir)


def run_prompts(prompt_set: str) -> List[str]:
    """Every prompt a run may encode: the ``train`` and ``eval`` splits of ``prompts.set`` (sampling and its
    grids, the monitor and ``eval`` draw from them), each once, in order."""
    from ..rewards.prompts import load_prompts

    return list(dict.fromkeys(load_prompts(prompt_set, "train") + load_prompts(prompt_set, "eval")))


def load_run_parts(cfg, device=None, dtype: torch.dtype = torch.float32):
    """The parts of ``pretrained.model`` for a run (training, ``eval``).  SD 1.x / SDXL: :func:`~.loading.load_sd`.
    SD 3.x: the prompt table of :func:`run_prompts` first (:func:`prompt_table`: cached, or computed by the text
    encoders alone on ``device`` in ``dtype``, which are released), then only the transformer and VAE; the table
    rides on the parts (``parts.encode`` / ``parts.uncond`` read it), so no text encoder is ever resident."""
    from .loading import is_sd3, load_sd

    p = cfg.pretrained
    if not is_sd3(p.model, p.revision):
        return load_sd(p.model, p.revision, p.seed, p.vae)
    options = TextOptions(p.max_sequence_length, p.t5)
    table = prompt_table(p.model, p.revision, p.seed, options, run_prompts(cfg.prompts.set),
                         f"{p.model}-{cfg.prompts.set}", device, dtype)
    parts = load_sd(p.model, p.revision, p.seed, p.vae, text_options=options, components=MODEL_PARTS)
    parts.prompt_table = table
    return parts
