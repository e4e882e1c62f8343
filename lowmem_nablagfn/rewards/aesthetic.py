"""LAION aesthetic score: CLIP ViT-L/14 image embedding -> the "improved aesthetic predictor" head.

    R(x) = head(e / |e|),  e = CLIP ViT-L/14 image embedding (768-d) of preprocess(x)

The head (``sac+logos+ava1-l14-linearMSE.pth``, LAION improved-aesthetic-predictor) is
768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts between and no activation (the official file's
ReLUs are commented out, so the head is affine); its state-dict keys are ``layers.{0,2,4,6,7}.*``.

Backbone: transformers' ``CLIPVisionModelWithProjection`` rather than open-clip-torch, because
(1) the official ∇-GFlowNet aesthetic reward uses transformers' ``openai/clip-vit-large-patch14``,
so the embeddings are the same ones the head was used with there; (2) ``from_pretrained`` on that
full CLIP repo (or a local copy) loads only the image tower and projection (304 M parameters) and
skips the text tower (123 M); (3) a ``save_pretrained`` folder loads offline.

``reward.checkpoint``: the head file (path or ``owner/repo/file`` on the hub); default: the real
trained head, shipped inside the package (``rewards/data/``, 3.7 MB, md5
``b1047fd767a00134b8fd6529bf19521a``; the file the official ∇-GFlowNet code ships in ``lib/assets/``),
so only the CLIP backbone has to be fetched.  ``reward.backbone``: a local copy of
``openai/clip-vit-large-patch14`` (full CLIP or vision-only folder) or that hub id (the default;
downloaded only when online).  ``random`` / ``random:reduced``: see :mod:`lowmem_nablagfn.rewards.loading`.

Preprocessing (default, ``reward.antialias`` unset): the official scorer's —
``F.interpolate(images, (224, 224), mode="bicubic")`` without antialiasing, then CLIP's mean/std
(bit-identical for square images; tested) — which is what the paper's β was tuned with.
``reward.antialias=true`` gives PIL-like bicubic instead (how CLIP was trained; the pixel gradient
then has cosine ≈ 0.6 to the official one on 512-px images).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .loading import (MissingCheckpointError, arch_size, load_exact, load_state_dict, random_size,
                      resolve_file, resolve_folder, seeded)
from .preprocess import ImageTransform
from .towers import TowerReward

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
#: the real trained LAION head, package data: the default ``reward.checkpoint``
DEFAULT_HEAD = Path(__file__).resolve().parent / "data" / HEAD_FILE
#: the official ∇-GFlowNet aesthetic preprocessing resizes without antialiasing
ANTIALIAS = False
DEFAULT_BACKBONE = "openai/clip-vit-large-patch14"
HOW_HEAD = (f"Download {HEAD_FILE} from the LAION improved-aesthetic-predictor repository "
            f"(christophschuhmann/improved-aesthetic-predictor on GitHub) and pass reward.checkpoint=PATH.")
HOW_BACKBONE = (f"Pass reward.backbone=DIR, a local copy of the hub repo {DEFAULT_BACKBONE} "
                f"(`hf download {DEFAULT_BACKBONE} --local-dir DIR`), or run online without HF_HUB_OFFLINE.")

#: CLIP ViT-L/14 image tower (openai/clip-vit-large-patch14) and a reduced one of the same classes.
VISION_CONFIGS = {
    "full": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "reduced": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=224, patch_size=32, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
}


class ScoreMLP(nn.Module):
    """The LAION / ImageReward score head: ``input_size -> 1024 -> 128 -> 64 -> 16 -> 1``.

    Dropouts sit between the linear layers (no activation), so the official keys are
    ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``.  Random weights keep torch's
    default ``nn.Linear`` initialisation (ImageReward's N(0, 1/(input_size + 1)) with zero biases
    makes random scores ~1e-12, useless for testing).
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        """(B, input_size) -> (B, 1)."""
        return self.layers(features)


class AestheticReward(TowerReward):
    """Aesthetic score of images in [0, 1] (prompt-free); towers: ``vision`` and ``head``."""

    prompt_free = True

    def __init__(self, vision: nn.Module, head: ScoreMLP, transform: Optional[ImageTransform] = None):
        super().__init__()
        self.vision = vision  # transformers CLIPVisionModelWithProjection
        self.head = head
        self.transform = transform or ImageTransform(size=vision.config.image_size, fit="crop", antialias=ANTIALIAS)

    def blocks(self) -> List[nn.Module]:
        return list(self.vision.vision_model.encoder.layers)

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> L2-normalised CLIP image embeddings (B, 768)."""
        embeds = self.vision(pixel_values=self.transform(images)).image_embeds
        return embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.head(self.embed(images)).squeeze(1)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (a full CLIP repo has 'unexpected' text-tower keys)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def random_vision(size: str = "full", seed: int = 0) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with seeded(seed):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIGS[size])).eval()


def load_vision(spec: Optional[str]) -> nn.Module:
    """The CLIP image tower + projection from a local folder or hub id (fp32)."""
    from transformers import CLIPVisionModelWithProjection

    folder = resolve_folder(spec or DEFAULT_BACKBONE, ["*.json", "*.safetensors"], ["config.json"], HOW_BACKBONE)
    with quiet_transformers():
        return CLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch.float32).eval()


def build(cfg, size: Optional[str] = None) -> AestheticReward:
    """The aesthetic reward of a :class:`~lowmem_nablagfn.config.RewardConfig` (fp32 weights, frozen, eval mode).

    Args:
        cfg: ``checkpoint`` = head file (None: the packaged head) | ``random`` | ``random:reduced``; ``backbone`` = CLIP
            ViT-L/14 folder or hub id (ignored for random weights).
        size: architecture of random weights (``full`` | ``reduced``); from ``cfg.checkpoint`` by default.
    """
    size = arch_size(cfg.checkpoint, size)
    if random_size(cfg.checkpoint):
        vision = random_vision(size)
        with seeded(1):
            head = ScoreMLP(vision.config.projection_dim)
        return AestheticReward(vision, head).eval().requires_grad_(False)
    head_path = resolve_file(cfg.checkpoint, str(DEFAULT_HEAD), HOW_HEAD)  # the cheap check first
    vision = load_vision(cfg.backbone)
    head = ScoreMLP(vision.config.projection_dim)
    load_exact(head, load_state_dict(head_path), str(head_path))
    return AestheticReward(vision, head).eval().requires_grad_(False)


__all__ = ["AestheticReward", "MissingCheckpointError", "ScoreMLP", "build"]
