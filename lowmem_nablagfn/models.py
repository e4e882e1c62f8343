"""Model loading: Stable Diffusion parts (local directory, hub id, ``tiny``, ``sd15-random``),
the LoRA adapter (peft) and the residual log-flow model ``g_φ``.

``tiny`` and ``sd15-random`` are random weights of the real diffusers/transformers classes,
deterministic from a seed; their tokenizer is the real CLIP BPE tokenizer, built from the vocabulary
that ships inside open-clip-torch (no download).
"""
from __future__ import annotations

import contextlib
import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional

import torch
from torch import nn

CLIP_VOCAB_SIZE = 49408


@dataclass
class SDParts:
    """The parts of a Stable Diffusion model the trainer uses."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler_config: dict

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# ----------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple:
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - core dependency
        raise ImportError("the CLIP vocabulary ships with open-clip-torch: pip install open-clip-torch") from exc
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(model_max_length: int = 77):
    """The CLIP BPE tokenizer (49408 tokens, same ids as open_clip's), offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                        pad_token="<|endoftext|>")
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


# ----------------------------------------------------------------------------- built-in models

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


def build_random_sd(name: str, seed: int = 0) -> SDParts:
    """``tiny`` or ``sd15-random``: real classes, random weights, deterministic from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .diffusion import SD_SCHEDULER_CONFIG

    cfgs = {"tiny": _tiny_configs, "sd15-random": _sd15_configs}[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfgs["unet"])
        vae = AutoencoderKL(**cfgs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text"]))
    return SDParts(unet, vae, text_encoder, clip_tokenizer(), dict(SD_SCHEDULER_CONFIG))


def load_sd(name: str, revision: Optional[str] = None, seed: int = 0) -> SDParts:
    """Load SD parts from ``tiny`` / ``sd15-random`` / a local diffusers directory / a hub id.

    Hub ids go through huggingface_hub, which honours ``HF_HUB_OFFLINE=1`` (cache only).
    """
    if name in ("tiny", "sd15-random"):
        return build_random_sd(name, seed)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not local.is_dir():
        raise FileNotFoundError(f"model directory {name} not found; give a diffusers model directory, "
                                f"a hub id, 'tiny' or 'sd15-random'")
    src = str(local) if local.is_dir() else name
    kw = {} if local.is_dir() else {"revision": revision}
    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (" HF_HUB_OFFLINE is set: download it once online, or point pretrained.model at a local "
                "directory." if offline else "")
        raise FileNotFoundError(f"could not load Stable Diffusion from {name!r}: {exc}.{hint}") from exc
    if len(tokenizer) != CLIP_VOCAB_SIZE:  # transformers can silently return a broken tokenizer
        raise RuntimeError(f"tokenizer of {name!r} has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}")
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return SDParts(unet, vae, text_encoder, tokenizer, config)


def save_sd(parts: SDParts, path: str | Path) -> None:
    """Write the parts as a diffusers model directory (loadable by ``StableDiffusionPipeline``)."""
    pipe = make_pipeline(parts)
    pipe.save_pretrained(str(path), safe_serialization=True)


def make_pipeline(parts: SDParts):
    """A ``StableDiffusionPipeline`` over the parts, DDIM scheduler, no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


# ----------------------------------------------------------------------------- LoRA

def freeze(module: torch.nn.Module, device=None, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """No gradients, eval mode, moved/cast.  diffusers 0.42's ``ModelMixin.to`` warns on every dtype
    cast even when the model keeps no module in float32 (its list is empty, as for SD 1.5), once per
    model per run; those models get ``torch.nn.Module.to``, the others keep diffusers' cast."""
    module.requires_grad_(False).eval()
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device, dtype=dtype)
    return torch.nn.Module.to(module, device, dtype=dtype)


def vae_encoder_modules(vae: torch.nn.Module) -> List[torch.nn.Module]:
    """The parts of an ``AutoencoderKL`` that only *encode* images (never used by sampling, the reward
    or training: they start from noise and only decode)."""
    return [m for m in (getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)) if m is not None]


def add_lora(unet: nn.Module, rank: int, target_modules: List[str], init: str = "gaussian",
             seed: int = 0) -> List[nn.Parameter]:
    """Attach a peft LoRA adapter (alpha = rank) and return its parameters, cast to fp32."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules),
                                    init_lora_weights=True if init == "default" else init))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no LoRA parameter was created: model.lora.target_modules={target_modules} "
                         f"matches no module of the UNet")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextlib.contextmanager
def reference_policy(unet: nn.Module) -> Iterator[nn.Module]:
    """The reference policy ``P_F^ref``: the same UNet with its adapter disabled."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


# ----------------------------------------------------------------------------- flow model

def build_flow_model(latent_channels: int, latent_size: int, cross_attention_dim: int,
                     block_widths: List[int], seed: int = 0) -> nn.Module:
    """Residual log-flow score model ``g_φ(x, t, c)``: a small UNet2DConditionModel whose output
    (the gradient field ∇_x log F̃_t) has a zero-initialised bias, 1 layer per block."""
    from diffusers import UNet2DConditionModel

    n = len(block_widths)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",) if n > 1 else ("CrossAttnDownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1) if n > 1 else ("CrossAttnUpBlock2D",)
    groups = min(32, min(block_widths))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = UNet2DConditionModel(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            layers_per_block=1, block_out_channels=tuple(block_widths), down_block_types=down,
            up_block_types=up, cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
            attention_head_dim=max(1, min(8, block_widths[0] // 8)))
    nn.init.zeros_(model.conv_out.bias)
    return model.float()
