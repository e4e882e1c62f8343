"""CLIPScore (Hessel et al. 2021, as torchmetrics computes it): CLIP ViT-L/14 image–prompt cosine × 100.

    R(x, c) = 100 · <e_img(preprocess(x)) / |.|,  e_txt(c) / |.|>      (CLIP openai/clip-vit-large-patch14)

torchmetrics' ``CLIPScore`` (1.9, ``torchmetrics/functional/multimodal/clip_score.py``) computes this
per pair and reports ``max(mean over the pairs, 0)``: the clip at 0 acts on the *mean* (its docstring's
per-pair ``max(100 cos, 0)`` is what a batch of one gives).  Here the reward is the per-pair value
*without* the clip, because (1) a clipped reward has zero gradient wherever cos < 0 — an image
unrelated to its prompt would get no signal towards it, the opposite of what training needs; (2) the
unclipped per-pair values are what torchmetrics averages, so ``max(mean(R), 0)`` over a batch *is*
torchmetrics' CLIPScore of that batch and ``max(R, 0)`` the score of one pair (tested to 1e-5); (3) with
the real weights cosines of generated images and their prompts are positive (CLIPScores of SD samples
lie around 25–35), so the values logged during training are torchmetrics' per-image scores.  Only an
image whose cosine is negative logs a negative value where torchmetrics would print 0.

Prompts longer than CLIP's 77 tokens are truncated keeping the end-of-text token (the tokenizer's
``truncation=True``); torchmetrics cuts the token ids after tokenising and so pools a different token.

Weights: ``reward.backbone`` = a local copy of ``openai/clip-vit-large-patch14`` (the folder the
aesthetic reward also uses) or that hub id (the default; from the local hub cache only when
``HF_HUB_OFFLINE`` is set).  ``reward.checkpoint`` is unused (``random`` / ``random:reduced`` build
random weights, :mod:`~.loading`).  Preprocessing: CLIPImageProcessor's (shortest side to 224 bicubic,
centre crop, CLIP mean/std) in torch, antialiased like PIL (``reward.antialias`` overrides).

This module also holds what PickScore shares (:mod:`~.pickscore`): the reward class over a transformers
``CLIPModel``, split into an image tower and a text tower, and the loading of a CLIPModel folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loading import MissingCheckpointError, random_size, resolve_folder, seeded
from .preprocess import ImageTransform
from .towers import TowerReward

DEFAULT_BACKBONE = "openai/clip-vit-large-patch14"
SCALE = 100.0
HOW = (f"Pass reward.backbone=DIR, a local copy of the hub repo {DEFAULT_BACKBONE} "
       f"(`hf download {DEFAULT_BACKBONE} --include '*.json' '*.safetensors' --local-dir DIR`), "
       f"or run online without HF_HUB_OFFLINE.")
#: the hub folder's files that a CLIPModel needs (the repos also hold .bin / TF / Flax copies)
PATTERNS = ["*.json", "*.safetensors"]
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

def clip_config(projection_dim: int, vision: tuple, text: tuple, act: str) -> dict:
    """CLIPConfig arguments: ``vision`` = (width, MLP width, layers, heads, patch), ``text`` = (width,
    MLP width, layers, heads); 224-px images, 77 tokens, CLIP's vocabulary."""
    def tower(width, mlp, layers, heads, **extra):
        return dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                    hidden_act=act, layer_norm_eps=1e-5, **extra)

    *v, patch = vision
    return dict(projection_dim=projection_dim, vision_config=tower(*v, image_size=224, patch_size=patch),
                text_config=tower(*text, max_position_embeddings=77, vocab_size=49408))


#: openai/clip-vit-large-patch14 and a reduced model of the same classes.
CONFIGS = {
    "full": clip_config(768, (1024, 4096, 24, 16, 14), (768, 3072, 12, 12), "quick_gelu"),
    "reduced": clip_config(64, (64, 128, 2, 4, 32), (64, 128, 2, 4), "quick_gelu"),
}


class ImageTower(nn.Module):
    """A CLIPModel's vision transformer and projection: (B, 3, S, S) normalised pixels -> (B, D) embeddings."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class TextTower(nn.Module):
    """A CLIPModel's text transformer and projection: (B, L) token ids and mask -> (B, D) embeddings
    (pooled at the end-of-text token; padding after it is masked and causally invisible)."""

    def __init__(self, text_model: nn.Module, text_projection: nn.Module):
        super().__init__()
        self.text_model = text_model
        self.text_projection = text_projection

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_projection(self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


class CLIPScoreReward(TowerReward):
    """``scale() × cos(image embedding, prompt embedding)`` of a transformers CLIPModel.

    Towers: ``vision`` (:class:`ImageTower`) and ``text`` (:class:`TextTower`).  ``logit_scale`` is the
    CLIPModel's (a buffer: kept in fp32 under ``reward.weight_dtype``); CLIPScore ignores it (× 100).
    Text embeddings depend on the prompt only: computed once per prompt (no graph) and cached.

    Args:
        clip: a transformers ``CLIPModel`` (its modules are taken over, not copied).
        tokenizer: CLIP BPE tokenizer; default the offline one
            (:func:`~lowmem_nablagfn.tokenizer.clip_tokenizer`).
        transform: image preprocessing; default CLIPImageProcessor's at the model's input size.
    """

    prompt_free = False

    def __init__(self, clip: nn.Module, tokenizer=None, transform: Optional[ImageTransform] = None):
        super().__init__()
        from ..tokenizer import clip_tokenizer

        self.vision = ImageTower(clip.vision_model, clip.visual_projection)
        self.text = TextTower(clip.text_model, clip.text_projection)
        self.register_buffer("logit_scale", clip.logit_scale.detach().float().clone())
        self.config = clip.config
        self.tokenizer = tokenizer or clip_tokenizer()
        self.max_length = clip.config.text_config.max_position_embeddings
        self.transform = transform or ImageTransform(size=clip.config.vision_config.image_size, fit="crop")
        self._text_cache: Dict[str, Tensor] = {}

    def blocks(self) -> List[nn.Module]:
        return list(self.vision.vision_model.encoder.layers) + list(self.text.text_model.encoder.layers)

    def scale(self) -> Tensor | float:
        """The factor of the cosine: CLIPScore's 100."""
        return SCALE

    def official_state_dict(self) -> Dict[str, Tensor]:
        """The state dict under a transformers CLIPModel's names (``vision_model.*``, ``text_model.*``, ...)."""
        state = {k.split(".", 1)[1]: v for k, v in self.state_dict().items() if k.startswith(("vision.", "text."))}
        return {**state, "logit_scale": self.logit_scale}

    @torch.no_grad()
    def precompute_text(self, prompts: Sequence[str], batch_size: int = 64) -> None:
        """Encode and cache the normalised embeddings of ``prompts`` not cached yet (fp32, no graph)."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        device = self.logit_scale.device
        with torch.autocast(device_type=device.type, enabled=False):
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                embeds = self.text(enc["input_ids"].to(device), enc["attention_mask"].to(device))
                self._text_cache.update(zip(chunk, F.normalize(embeds.float(), dim=-1).cpu()))

    def text_features(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        """(B, D) normalised prompt embeddings from the cache (filled on a miss)."""
        self.precompute_text(prompts)
        return torch.stack([self._text_cache[p] for p in prompts]).to(device)

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) normalised image embeddings."""
        return F.normalize(self.vision(self.transform(images)), dim=-1)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        cos = (self.embed(images) * self.text_features(prompts, images.device)).sum(-1)
        return self.scale() * cos


def create_clip(configs: Dict[str, dict], size: str = "full", seed: int = 0) -> nn.Module:
    """A transformers CLIPModel of ``configs[size]`` with random weights (fp32, eval)."""
    from transformers import CLIPConfig, CLIPModel

    with seeded(seed):
        return CLIPModel(CLIPConfig(**configs[size])).eval()


def load_clip(spec: str, how: str) -> nn.Module:
    """A transformers CLIPModel (fp32, eval) from a local folder or a hub repo id (the cache only offline)."""
    from transformers import CLIPModel

    from .aesthetic import quiet_transformers

    folder = resolve_folder(spec, PATTERNS, ["config.json"], how)
    if not any((Path(folder) / name).is_file() for name in WEIGHTS):
        raise MissingCheckpointError(f"backbone {spec!r} ({folder}) has config.json but no weights "
                                     f"({' or '.join(WEIGHTS[::2])}). {how}")
    with quiet_transformers():
        return CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()


def random_clip(size: str = "full", seed: int = 0) -> nn.Module:
    """CLIP ViT-L/14 (``full``) or a reduced CLIP, random weights: what ``reward.checkpoint=random[:reduced]`` wraps."""
    return create_clip(CONFIGS, size, seed)


def wrap(clip: nn.Module) -> CLIPScoreReward:
    """CLIPScore over a CLIPModel's modules (frozen, eval mode)."""
    return CLIPScoreReward(clip).eval().requires_grad_(False)


def build(cfg, size: Optional[str] = None) -> CLIPScoreReward:
    """CLIPScore of a :class:`~lowmem_nablagfn.config.RewardConfig` (fp32 weights, frozen, eval mode).

    Args:
        cfg: ``backbone`` = openai/clip-vit-large-patch14 folder or hub id (default that hub id);
            ``checkpoint`` = None | ``random`` | ``random:reduced``.
        size: architecture of random weights (``full`` | ``reduced``); from ``cfg.checkpoint`` by default.
    """
    if random_size(cfg.checkpoint):
        return wrap(random_clip(size or random_size(cfg.checkpoint)))
    return wrap(load_clip(cfg.backbone or DEFAULT_BACKBONE, HOW))


__all__ = ["CLIPScoreReward", "ImageTower", "MissingCheckpointError", "TextTower", "build", "create_clip",
           "load_clip", "random_clip", "wrap"]
