"""The built-in random-weight models: ``tiny``, ``sd15-random``, ``tiny-sdxl`` and ``sdxl-random``.

Their component configs (UNet, VAE, text encoder(s)) are the real architectures' (SD 1.5, SDXL base)
or tiny test versions of them; :func:`build_random_sd` instantiates the real diffusers/transformers
classes with random weights, deterministic from a seed.  Single-file checkpoints are identified
against the same configs (:mod:`.single_file`).
"""
from __future__ import annotations

from typing import Optional

import torch

from .parts import SDParts
from .preview import preview_decoder_
from ..tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer


def _tiny_configs() -> dict:
    unet = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                attention_head_dim=4, norm_num_groups=8)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=1, norm_num_groups=8, sample_size=64)
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    return dict(unet=unet, vae=vae, text=text)


def _sd15_configs() -> dict:
    unet = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, sample_size=512)
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return dict(unet=unet, vae=vae, text=text)


def _sdxl_unet(blocks, down, up, heads, layers, transformer_layers, cross_dim, time_dim, pooled_dim, **extra) -> dict:
    """An SDXL UNet config: ``text_time`` added conditioning = 6 time ids × ``time_dim`` + pooled."""
    return dict(in_channels=4, out_channels=4, layers_per_block=layers, block_out_channels=blocks,
                down_block_types=down, up_block_types=up, attention_head_dim=heads,
                transformer_layers_per_block=transformer_layers, cross_attention_dim=cross_dim,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + pooled_dim, **extra)


def _tiny_sdxl_configs() -> dict:
    """Tiny SDXL: two small text encoders of different widths (32 + 48 = 80-wide prompt embeddings,
    48-wide pooled projection), a 2-block ``text_time`` UNet, the tiny VAE with SDXL's scaling."""
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, projection_dim=32)
    text_2 = dict(text, hidden_size=48, intermediate_size=96, num_hidden_layers=3, hidden_act="gelu",
                  projection_dim=48, pad_token_id=0)
    unet = _sdxl_unet((32, 64), ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"),
                      heads=(2, 4), layers=1, transformer_layers=(1, 2), cross_dim=80, time_dim=8, pooled_dim=48,
                      sample_size=8, norm_num_groups=8)
    vae = dict(_tiny_configs()["vae"], scaling_factor=0.13025, force_upcast=True)
    return dict(unet=unet, vae=vae, text=text, text_2=text_2)


def _sdxl_configs() -> dict:
    """SDXL base 1.0's architecture (stabilityai/stable-diffusion-xl-base-1.0 component configs)."""
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    text_2 = dict(text, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)
    unet = _sdxl_unet((320, 640, 1280), ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), heads=(5, 10, 20), layers=2,
                      transformer_layers=(1, 2, 10), cross_dim=2048, time_dim=256, pooled_dim=1280,
                      sample_size=128)
    vae = dict(_sd15_configs()["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    return dict(unet=unet, vae=vae, text=text, text_2=text_2)


#: Built-in random-weight models (real classes, deterministic from ``pretrained.seed``).
BUILTIN_CONFIGS = {"tiny": _tiny_configs, "sd15-random": _sd15_configs,
                   "tiny-sdxl": _tiny_sdxl_configs, "sdxl-random": _sdxl_configs}
#: Pixels of the built-in models' native resolution (``sampling.resolution`` default in their presets).
NATIVE_RESOLUTION = {"tiny": 64, "sd15-random": 512, "tiny-sdxl": 64, "sdxl-random": 1024}


def builtin_configs(name: str) -> dict:
    """Fresh component configs (``unet``, ``vae``, ``text`` and, for SDXL, ``text_2``) of the built-in
    model ``name`` (one of :data:`BUILTIN_CONFIGS`)."""
    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_CONFIGS)}")
    return BUILTIN_CONFIGS[name]()


def instantiate(cfgs: dict, scheduler_config: Optional[dict] = None) -> SDParts:
    """SD parts of the given component configs (``unet``, ``vae``, ``text`` and, for SDXL,
    ``text_2``), with the offline CLIP tokenizers; random weights (or on the current default device,
    e.g. ``meta`` for the planner)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..diffusion import SD_SCHEDULER_CONFIG

    def text_config(c: dict) -> CLIPTextConfig:
        return CLIPTextConfig(**{k: v for k, v in c.items() if not k.startswith("_")})

    unet = UNet2DConditionModel.from_config(cfgs["unet"])
    vae = AutoencoderKL.from_config(cfgs["vae"])
    text_encoder = CLIPTextModel(text_config(cfgs["text"]))
    text_encoder_2 = tokenizer_2 = None
    if cfgs.get("text_2") is not None:
        text_encoder_2 = CLIPTextModelWithProjection(text_config(cfgs["text_2"]))
        tokenizer_2 = clip_tokenizer(pad_token="!")
    return SDParts(unet, vae, text_encoder, clip_tokenizer(), dict(scheduler_config or SD_SCHEDULER_CONFIG),
                   text_encoder_2, tokenizer_2)


def build_random_sd(name: str, seed: int = 0) -> SDParts:
    """``tiny``, ``sd15-random``, ``tiny-sdxl`` or ``sdxl-random``: real classes, random weights,
    deterministic from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = instantiate(builtin_configs(name))
    if name == "tiny":  # a decoder whose colours follow the latents: the default job's effect is visible
        preview_decoder_(parts.vae)
    return parts
