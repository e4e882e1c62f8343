"""PickScore v1 (Kirstain et al. 2023): CLIP ViT-H/14 finetuned on Pick-a-Pic human preferences.

    R(x, c) = exp(logit_scale) · <e_img(preprocess(x)) / |.|,  e_txt(c) / |.|>     (≈ 100 · cos; ~18–24)

This is the reference code of the model card (``yuvalkirstain/PickScore_v1``): transformers
``CLIPModel.get_image_features`` / ``get_text_features``, both L2-normalised, times
``logit_scale.exp()`` — the score before the softmax over images.  The math runs in fp32 (the scale is
a buffer, never rounded to bf16) and is differentiable in the pixels.

Weights: ``reward.backbone`` = a local copy of the hub repo ``yuvalkirstain/PickScore_v1`` (a CLIPModel
folder: config.json + weights) or that hub id (the default; from the local hub cache only when
``HF_HUB_OFFLINE`` is set).  ``reward.checkpoint`` is unused (``random`` / ``random:reduced``: random
weights of the ViT-H/14 architecture or a reduced one, :mod:`~.loading`).

Processor: that of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` — CLIPImageProcessor with OpenAI's CLIP
settings (shortest side to 224 bicubic, centre crop 224, CLIP mean/std), reproduced on tensors by
:class:`~.preprocess.ImageTransform` (PIL-like antialiased bicubic; ``reward.antialias`` overrides), and
the CLIP BPE tokenizer (49408 tokens, padded, truncated to 77 tokens), built offline from open_clip's
vocabulary (:func:`~lowmem_nablagfn.tokenizer.clip_tokenizer`) — the same vocabulary and merges
as the laion repo's tokenizer.  No file of the laion repo is needed.

The architecture is open_clip's ViT-H-14 in transformers' classes (GELU, 986 M parameters: the HPSv2
architecture), so the memory knobs act as for HPSv2: bf16 storage with fp32 math, activation
checkpointing of each transformer block.  Everything else is :class:`~.clipscore.CLIPScoreReward`'s.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .clipscore import CLIPScoreReward, clip_config, create_clip, load_clip
from .loading import MissingCheckpointError, random_size

DEFAULT_BACKBONE = "yuvalkirstain/PickScore_v1"
PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # reproduced, never read
HOW = (f"Pass reward.backbone=DIR, a local copy of the hub repo {DEFAULT_BACKBONE} "
       f"(`hf download {DEFAULT_BACKBONE} --include '*.json' '*.safetensors' --local-dir DIR`), "
       f"or run online without HF_HUB_OFFLINE.")

#: PickScore_v1 = laion CLIP-ViT-H-14 (open_clip's ViT-H-14 in CLIPConfig arguments) and a reduced model.
CONFIGS = {
    "full": clip_config(1024, (1280, 5120, 32, 16, 14), (1024, 4096, 24, 16), "gelu"),
    "reduced": clip_config(64, (64, 128, 2, 4, 32), (64, 128, 2, 4), "gelu"),
}


class PickScoreReward(CLIPScoreReward):
    """PickScore of (image, prompt) pairs: ``exp(logit_scale) × cos`` (see the module docstring)."""

    def scale(self) -> Tensor:
        return self.logit_scale.exp()


def random_clip(size: str = "full", seed: int = 0) -> nn.Module:
    """The PickScore architecture (``full``) or a reduced one, random weights (what ``random[:reduced]`` wraps)."""
    return create_clip(CONFIGS, size, seed)


def wrap(clip: nn.Module) -> PickScoreReward:
    """PickScore over a CLIPModel's modules (frozen, eval mode)."""
    return PickScoreReward(clip).eval().requires_grad_(False)


def build(cfg, size: Optional[str] = None) -> PickScoreReward:
    """PickScore of a :class:`~lowmem_nablagfn.config.RewardConfig` (fp32 weights, frozen, eval mode).

    Args:
        cfg: ``backbone`` = PickScore_v1 folder or hub id (default that hub id); ``checkpoint`` = None |
            ``random`` | ``random:reduced``.
        size: architecture of random weights (``full`` | ``reduced``); from ``cfg.checkpoint`` by default.
    """
    if random_size(cfg.checkpoint):
        return wrap(random_clip(size or random_size(cfg.checkpoint)))
    return wrap(load_clip(cfg.backbone or DEFAULT_BACKBONE, HOW))


__all__ = ["MissingCheckpointError", "PickScoreReward", "build", "random_clip", "wrap"]
