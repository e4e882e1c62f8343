"""Metrics of generated images, as the paper's evaluation reports them (:mod:`lowmem_nablagfn.evaluate`):

* **diversity**: mean over prompts of the mean pairwise ``1 − cos`` distance between the embeddings
  of that prompt's images — DreamSim, else the reward model's image tower, else 32-px pixels;
* **FID** (prior preservation): torchmetrics' Fréchet Inception Distance, with local Inception-v3
  weights (never downloaded) or a custom feature module;
* **CLIP score**: ``100 · max(cos(image, text), 0)`` with a local transformers CLIP folder;
* :func:`summary`: mean / std of a list of per-image values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
PIXEL_SIDE = 32


def mean_pairwise_cosine_distance(embeddings: Tensor, groups: Sequence[int]) -> Optional[float]:
    """Mean over groups (prompts) of the mean ``1 − cos`` over the pairs of that group's embeddings.

    Args:
        embeddings: (N, D).
        groups: N group ids; groups with fewer than 2 members are skipped.
    """
    e = F.normalize(embeddings.double(), dim=-1)
    ids = torch.as_tensor(list(groups))
    values = []
    for g in ids.unique():
        x = e[ids == g]
        n = x.shape[0]
        if n < 2:
            continue
        sim = x @ x.T
        values.append(float((n * n - sim.sum()) / (n * (n - 1))))  # off-diagonal mean of 1 − cos
    return sum(values) / len(values) if values else None


def diversity_embedder(reward_model: nn.Module, dreamsim_cache: Optional[str], device) -> tuple:
    """(embed fn: images in [0, 1] -> (B, D), method, note) — DreamSim, the reward's tower, or pixels."""
    if dreamsim_cache:
        try:
            from dreamsim import dreamsim
        except ImportError as exc:
            raise ImportError("--dreamsim-cache needs the dreamsim package: pip install dreamsim") from exc
        model, _ = dreamsim(pretrained=True, device=str(device), cache_dir=str(Path(dreamsim_cache).expanduser()))

        def embed(images: Tensor) -> Tensor:  # dreamsim's preprocess: bicubic 224 px, [0, 1]
            x = F.interpolate(images, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
            return model.embed(x)

        return embed, "dreamsim", f"DreamSim from {dreamsim_cache}; distance = 1 - cos of DreamSim embeddings"
    tower = getattr(reward_model, "image_embeddings", None) or getattr(reward_model, "embed", None)
    if callable(tower):
        return (tower, "reward-image-tower",
                f"1 - cos of the reward model's image embeddings ({type(reward_model).__name__}); "
                f"DreamSim (--dreamsim-cache DIR) is the paper's metric")

    def pixels(images: Tensor) -> Tensor:
        return (F.adaptive_avg_pool2d(images.float(), PIXEL_SIDE) * 2 - 1).flatten(1)

    return (pixels, "pixel-cosine",
            f"the reward model has no image tower: 1 - cos of {PIXEL_SIDE}x{PIXEL_SIDE} pixels in [-1, 1] "
            f"(a weak proxy); pass --dreamsim-cache DIR (an unzipped DreamSim release) for the paper's metric")


def clip_scorer(path: str, device) -> Callable[[Tensor, List[str]], Tensor]:
    """``score(images, prompts) -> (B,)`` CLIP score ``100 · max(cos, 0)`` from a local transformers CLIP."""
    from transformers import CLIPModel, CLIPTokenizer

    from .tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer
    from .rewards.preprocess import ImageTransform

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--clip {path}: not a folder; give a local transformers CLIP folder, e.g. "
                                f"`hf download openai/clip-vit-large-patch14 config.json model.safetensors "
                                f"--local-dir ckpt/clip-l14`")
    model = CLIPModel.from_pretrained(str(folder)).to(device).eval().requires_grad_(False)
    tokenizer = None
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    if tokenizer is None or len(tokenizer) != CLIP_VOCAB_SIZE:  # transformers can return a broken one
        tokenizer = clip_tokenizer(model.config.text_config.max_position_embeddings)
    transform = ImageTransform(size=model.config.vision_config.image_size, fit="crop")

    def features(out) -> Tensor:  # transformers 5 returns an output object, 4 a tensor
        return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)

    @torch.no_grad()
    def score(images: Tensor, prompts: List[str]) -> Tensor:
        ids = tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                        max_length=model.config.text_config.max_position_embeddings).input_ids.to(device)
        image = features(model.get_image_features(pixel_values=transform(images.float())))
        text = features(model.get_text_features(input_ids=ids))
        return 100 * (image * text).sum(-1).clamp(min=0)

    return score


def default_inception_weights() -> Optional[Path]:
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return path if path.is_file() else None


def build_fid(weights: Optional[str], feature: Optional[nn.Module], device) -> tuple:
    """(torchmetrics FrechetInceptionDistance or None, message).

    ``feature``: a module mapping images (B, 3, H, W) float in [0, 1] to (B, D) features, used
    instead of Inception (then the value is not comparable with published FIDs).
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return None, "FID needs torchmetrics and torch-fidelity: pip install 'lowmem-nablagfn[eval]'"
    if feature is not None:
        return FrechetInceptionDistance(feature=feature, normalize=True).to(device), \
            f"features of a custom module ({type(feature).__name__}), not Inception-v3"
    path = Path(weights).expanduser() if weights else default_inception_weights()
    if path is None or not path.is_file():
        missing = f"{weights} does not exist; " if weights else ""
        return None, (f"FID needs Inception-v3 weights, which are never downloaded here: {missing}download "
                      f"{INCEPTION_URL} once and pass --inception-weights PATH (or put it in "
                      f"{Path(torch.hub.get_dir()) / 'checkpoints'}/)")
    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))
    except ModuleNotFoundError:
        return None, "FID with Inception needs torch-fidelity: pip install 'lowmem-nablagfn[eval]'"
    return metric.to(device), f"torchmetrics FrechetInceptionDistance, 2048-d Inception-v3 ({path.name})"


def summary(values: List[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"mean": None, "std": None}
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}
