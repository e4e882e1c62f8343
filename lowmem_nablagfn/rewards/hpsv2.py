"""HPSv2 / HPSv2.1: an OpenCLIP ViT-H-14 finetuned on human preferences (Wu et al. 2023).

    R(x, c) = <f_img(preprocess(x)) / |.|,  f_txt(c) / |.|>       (cosine similarity, in ~[0.2, 0.35])

This is the official score: ``hpsv2.score`` (and the official ∇-GFlowNet ``hpscore``) take the
diagonal of ``image_features @ text_features.T`` with normalised features and do *not* multiply by
``logit_scale`` (100): the paper's β = 5e5 for HPSv2 is calibrated on this scale.

Weights: upstream open-clip-torch builds the architecture (the ``hpsv2`` package vendors an
open_clip with the same parameter names and shapes, and pins old dependencies); the HPS file
(``{'state_dict': ...}`` or a plain state dict) is loaded exactly.  ``hpsv2`` uses
``HPS_v2_compressed.pt``, ``hpsv2.1`` ``HPS_v2.1_compressed.pt`` (the official ∇-GFlowNet code
loads v2.1), both from the hub repo ``xswu/HPSv2`` by default; ``reward.checkpoint`` overrides
(path or ``owner/repo/file``); ``random`` / ``random:reduced``: see :mod:`~.loading`.

Text features depend on the prompt only: they are computed once per prompt (no graph) and cached.
:meth:`HPSv2Reward.precompute_text` fills the cache for a prompt set, after which
:meth:`HPSv2Reward.offload_text_tower` moves the text tower (354 M parameters of 986 M) off the
accelerator, or drops it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loading import (MissingCheckpointError, arch_size, load_exact, load_state_dict, random_size,
                      resolve_file, seeded)
from .preprocess import ImageTransform
from .towers import TowerReward

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}


def how_to_get(name: str) -> str:
    file = HPS_FILES.get(name, HPS_FILES["hpsv2"])
    return (f"Download {file} from the hub repo {HPS_REPO} (`hf download {HPS_REPO} {file} --local-dir DIR`; "
            f"{HPS_FILES['hpsv2']} for hpsv2, {HPS_FILES['hpsv2.1']} for hpsv2.1) "
            f"and pass reward.checkpoint=DIR/{file}.")


def clip_config(size: str = "full") -> dict:
    """open_clip CLIP arguments: ViT-H-14 (as ``open_clip.create_model('ViT-H-14')``) or reduced."""
    if size == "full":
        import open_clip

        return open_clip.get_model_config("ViT-H-14")
    return {"embed_dim": 64,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 16, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


def create_clip(size: str = "full", seed: int = 0) -> nn.Module:
    """An open_clip ``CLIP`` of the given size with random weights (fp32, eval)."""
    import open_clip

    with seeded(seed):
        return open_clip.CLIP(**clip_config(size)).eval()


def _float32() -> torch.dtype:
    return torch.float32


class HPSv2Reward(TowerReward):
    """HPSv2 score of (image, prompt) pairs; towers: ``visual`` (open_clip image tower) and ``text``
    (the rest of the open_clip CLIP: token embedding, text transformer, projections)."""

    prompt_free = False

    def __init__(self, clip: nn.Module, transform: Optional[ImageTransform] = None):
        super().__init__()
        import open_clip

        self.visual = clip.visual
        del clip.visual
        # encode_text casts its input to a block's weight dtype; with bf16 storage the math is still fp32.
        clip.transformer.get_cast_dtype = _float32
        self.text = clip  # CLIP.forward(text=...) runs encode_text only
        self.tokenizer = open_clip.SimpleTokenizer(context_length=clip.context_length)
        self.transform = transform or ImageTransform(size=self.visual.image_size[0], fit="pad")
        self._text_cache: Dict[str, Tensor] = {}
        object.__setattr__(self, "_offloaded_text", None)  # outside the module tree, see offload_text_tower

    def blocks(self) -> List[nn.Module]:
        text = self._text_tower()
        return list(self.visual.transformer.resblocks) + (list(text.transformer.resblocks) if text is not None else [])

    def official_state_dict(self) -> Dict[str, Tensor]:
        """The state dict under the official (open_clip CLIP) names, as in an HPS file."""
        text = self._text_tower()
        if text is None:
            raise RuntimeError("the text tower was dropped by offload_text_tower(None)")
        return {**{f"visual.{k}": v for k, v in self.visual.state_dict().items()}, **text.state_dict()}

    # ------------------------------------------------------------------ text features
    def _text_tower(self) -> Optional[nn.Module]:
        return self._modules.get("text", self._offloaded_text)

    @torch.no_grad()
    def precompute_text(self, prompts: Sequence[str], batch_size: int = 64) -> None:
        """Encode and cache the features of ``prompts`` not cached yet (fp32, no graph)."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if not todo:
            return
        text = self._text_tower()
        if text is None:
            raise RuntimeError(f"prompt {todo[0]!r} has no cached features and the text tower was dropped "
                               "(offload_text_tower(None)): precompute_text(all prompts) before dropping it")
        device = next(text.parameters()).device
        with torch.autocast(device_type=device.type, enabled=False):
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                tokens = self.tokenizer(chunk).to(device)
                out = text(text=tokens)
                features = out["text_features"] if isinstance(out, dict) else out[1]
                self._text_cache.update(zip(chunk, features.float().cpu()))

    def text_features(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        """(B, D) normalised text features of ``prompts`` from the cache (filled on a miss)."""
        self.precompute_text(prompts)
        return torch.stack([self._text_cache[p] for p in prompts]).to(device)

    def offload_text_tower(self, device: Optional[str | torch.device] = "cpu") -> None:
        """Take the text tower out of the module (a later ``.to()`` leaves it where it is).

        ``device``: where it goes (new prompts are encoded there); None drops it (new prompts are
        then an error).  Call :meth:`precompute_text` first for the prompts of the run.
        """
        text = self._modules.pop("text", None) or self._offloaded_text
        if text is not None and device is not None:
            text = text.to(device)
        object.__setattr__(self, "_offloaded_text", text if device is not None else None)

    # ------------------------------------------------------------------ score
    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised image features (B, D)."""
        return F.normalize(self.visual(self.transform(images)), dim=-1)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        image_features = self.embed(images)
        return (image_features * self.text_features(prompts, images.device)).sum(-1)


def build(cfg, size: Optional[str] = None) -> HPSv2Reward:
    """HPSv2 (``cfg.name`` = ``hpsv2`` | ``hpsv2.1``) from ``cfg.checkpoint`` (fp32 weights, frozen, eval mode).

    Args:
        cfg: a RewardConfig; ``backbone`` is unused (the architecture is ViT-H-14).
        size: architecture (``full`` | ``reduced``); from ``cfg.checkpoint`` by default.
    """
    size = arch_size(cfg.checkpoint, size)
    if random_size(cfg.checkpoint):
        return HPSv2Reward(create_clip(size)).eval().requires_grad_(False)
    name = cfg.name if cfg.name in HPS_FILES else "hpsv2"
    path = resolve_file(cfg.checkpoint, f"{HPS_REPO}/{HPS_FILES[name]}", how_to_get(name))
    clip = create_clip(size)
    load_exact(clip, load_state_dict(path, key="state_dict"), str(path))
    return HPSv2Reward(clip).eval().requires_grad_(False)


__all__ = ["HPSv2Reward", "MissingCheckpointError", "build", "create_clip"]
