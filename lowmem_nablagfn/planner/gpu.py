"""The card: what a GPU adds to the CPU trace, and which attention kernel it runs.

Card classes (:data:`CARDS`, :data:`CARD_CAPABILITY`), the GPU-only memory the live-bytes trace cannot
see (allocator fragmentation, CUDA context, cuDNN workspaces, fused-attention scratch), the SDPA kernel
model (:func:`sdpa_kernel`, :func:`attention_kernels`) and reading a card size (:func:`parse_vram`).
Every constant is an estimate until ``benchmarks/gpu_validate.py`` has measured it; its source is
noted beside it.
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch

from ..config import Config
from ..dtypes import DTYPES
from ..memtrack import GiB

if TYPE_CHECKING:
    from .meta import Models

#: Memory a program can allocate on each card (GiB, as ``torch.cuda.get_device_properties`` reports).
CARDS: Dict[str, float] = {
    "A100-80": 79.2, "L40-48": 44.4, "V100-32": 31.7, "RTX4090-24": 23.6, "V100-16": 15.8,
    "12GB": 11.7, "8GB": 7.7,
}
#: Compute capability of each card class of :data:`CARDS` (the SDPA kernel depends on it); the
#: generic 12 / 8 GB cards are taken as consumer Ampere (RTX 3060 12 GB, RTX 3070 8 GB).
CARD_CAPABILITY: Dict[str, Tuple[int, int]] = {
    "A100-80": (8, 0), "L40-48": (8, 9), "V100-32": (7, 0), "RTX4090-24": (8, 9), "V100-16": (7, 0),
    "12GB": (8, 6), "8GB": (8, 6),
}
#: Assumed when neither a card name nor a CUDA device says otherwise.
DEFAULT_CAPABILITY = (8, 0)

# GPU-only memory the CPU trace cannot see.  Every constant below is an ESTIMATE, to be calibrated on
# a GPU with benchmarks/gpu_validate.py (which prints predicted vs measured max_memory_allocated /
# max_memory_reserved per configuration); until then they are deliberately on the safe side.
#: Allocator rounding and segment fragmentation: ``max_memory_reserved`` / ``max_memory_allocated``
#: - 1.  With ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (set by every launcher in launch/)
#: segments grow in place instead of leaving holes (PyTorch docs, "CUDA memory management"); without
#: it the caching allocator's block splitting leaves more.  Estimates, to be calibrated.
FRAGMENTATION = 0.05
FRAGMENTATION_FIXED_SEGMENTS = 0.15
#: CUDA context + cuBLAS/cuDNN handles and their loaded kernels, outside PyTorch's allocator (hence
#: outside max_memory_reserved, inside the card's total), by compute-capability major.  The issue's
#: "often 0.6-1 GiB with cuBLAS/cuDNN"; estimates, to be calibrated (nvidia-smi used - reserved).
CONTEXT_GIB_BY_MAJOR = {7: 0.6, 8: 0.8, 9: 1.0}
CONTEXT_GIB = 0.8
#: cuDNN convolution workspace: PyTorch allocates it through the caching allocator, so it counts in
#: max_memory_allocated but not in the CPU trace.  Per phase, for the UNet/VAE convolutions with a
#: backward (``grad``) and without (``nograd``).  Estimates, to be calibrated (the VAE decoder's
#: backward at 512 px is the suspect).
CUDNN_WORKSPACE_GIB = {"grad": 0.5, "nograd": 0.25}
#: Flash / memory-efficient attention backward scratch (fp32 ``dq`` accumulator and ``delta`` of the
#: largest attention layer), bytes per row per latent pixel per channel: 2 (CFG) x 4 (fp32).
#: Estimate from the kernels' documented buffers (PyTorch ``sdp_utils``, xformers cutlass backward).
ATTN_SCRATCH_BYTES = 8
#: A proposal fits a card only if at least this much is left after peak x (1 + fragmentation) + context.
MIN_SLACK_GIB = 0.5


def fragmentation_default() -> float:
    """:data:`FRAGMENTATION` when this process's allocator uses expandable segments (the launchers'
    setting) or when planning for another machine; :data:`FRAGMENTATION_FIXED_SEGMENTS` in a CUDA
    process started without it."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments:True" in conf or not torch.cuda.is_available():
        return FRAGMENTATION
    return FRAGMENTATION_FIXED_SEGMENTS


def card_context_gib(capability: Optional[Tuple[int, int]]) -> float:
    return CONTEXT_GIB_BY_MAJOR.get(capability[0], CONTEXT_GIB) if capability else CONTEXT_GIB


def sdpa_kernel(dtype: torch.dtype, capability: Tuple[int, int], head_dim: int) -> str:
    """The kernel ``F.scaled_dot_product_attention`` picks on CUDA (PyTorch 2.x,
    ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``): ``flash`` for fp16/bf16 on sm80 and
    newer with a head dimension <= 256 (multiple of 8); else ``mem_efficient`` on sm50 and newer for
    fp32/fp16, and bf16 only from sm80; else ``math`` (the attention matrix is materialised)."""
    sm = capability[0] * 10 + capability[1]
    half = dtype in (torch.float16, torch.bfloat16)
    if half and sm >= 80 and head_dim <= 256 and head_dim % 8 == 0:
        return "flash"
    if sm >= 50 and (dtype != torch.bfloat16 or sm >= 80):
        return "mem_efficient"
    return "math"


def attention_kernels(cfg: Config, models: "Models", capability: Tuple[int, int]) -> Dict[str, str]:
    """Attention kernel of the UNet, VAE and flow model under ``memory.attention`` on this card.

    ``math`` forces the math kernel everywhere; ``xformers`` counts as ``mem_efficient`` (its kernels
    keep the same buffers; none exists for bf16 before sm80, where it is reported as ``math``)."""
    frozen = DTYPES[cfg.training.mixed_precision]
    unet_cfg, vae_cfg = models.denoiser.config, models.vae.config
    if models.is_sd3:  # the MMDiT's joint attention: heads of attention_head_dim
        unet_head_dim = unet_cfg.attention_head_dim
    else:
        # with ``num_attention_heads`` unset, diffusers reads ``attention_head_dim`` as the number of heads
        heads = getattr(unet_cfg, "num_attention_heads", None) or unet_cfg.attention_head_dim
        widths = list(unet_cfg.block_out_channels)
        heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
        unet_head_dim = max(c // h for c, h in zip(widths, heads))
    # the VAE's mid-block attention: one head over all channels
    parts = {"unet": (frozen, unet_head_dim), "vae": (frozen, vae_cfg.block_out_channels[-1])}
    if models.flow_model is not None and not cfg.model.no_flow:
        parts["flow"] = (torch.float32, 8)
    out = {}
    for name, (dtype, head_dim) in parts.items():
        if cfg.memory.attention == "math":
            out[name] = "math"
        else:
            k = sdpa_kernel(dtype, capability, head_dim)
            out[name] = "mem_efficient" if cfg.memory.attention == "xformers" and k == "flash" else k
    return out


def attention_extent(models: "Models", latent_hw: Tuple[int, int]) -> int:
    """Tokens x channels of the largest attention layer of one row (what :data:`ATTN_SCRATCH_BYTES` scales):
    the UNet's first level (latent pixels x its first width), the VAE's mid-block (latent pixels x its last
    width), or SD 3.x's joint attention (patches + text tokens x heads · head width)."""
    h, w = latent_hw
    vae = h * w * models.vae.config.block_out_channels[-1]
    c = models.denoiser.config
    if models.is_sd3:
        tokens = (h // c.patch_size) * (w // c.patch_size) + models.text_shape[0]
        return max(tokens * c.num_attention_heads * c.attention_head_dim, vae)
    return max(h * w * c.block_out_channels[0], vae)


def cudnn_workspace_bytes(models: "Models", latent_hw: Tuple[int, int], itemsize: int) -> Dict[str, float]:
    """cuDNN workspace allowance (bytes) of a pass with a backward (``grad``) and without (``nograd``).

    The flat :data:`CUDNN_WORKSPACE_GIB`, but never more than the lowered-GEMM (im2col) buffer of the
    largest 3x3 convolution for one row: ``in_channels x 9 x height x width x itemsize``.  A workspace
    is scratch for one convolution call and cuDNN does not ask for more than that lowering needs, so a
    small model's convolutions get a few MiB (the tiny model at 64 px: 2.3 MiB in bf16), not half a GiB.
    SD 1.5 at 512 px (the VAE decoder's 256 -> 128-channel convolution at full resolution, 1.1 GiB)
    and SDXL keep the flat figure: the presets' predictions do not move.

    Args:
        models: the meta models (their UNet and VAE configs).
        latent_hw: latent height and width.
        itemsize: bytes per element of the convolutions' inputs (the frozen dtype).
    """
    h, w = latent_hw
    unet = [] if models.is_sd3 else models.denoiser.config.block_out_channels  # the MMDiT: no 3x3 convolution
    vae = list(models.vae.config.block_out_channels)
    # UNet level i runs at latent / 2^i; the VAE decoder's level i at pixels / 2^i (latent x
    # 2^(levels-1)), its first convolution there still fed by level i+1's channels
    largest = [unet[i] * (h >> i) * (w >> i) for i in range(len(unet))]
    scale = 2 ** (len(vae) - 1)
    largest += [vae[min(i + 1, len(vae) - 1)] * (h * scale >> i) * (w * scale >> i) for i in range(len(vae))]
    im2col = 9.0 * max(largest) * itemsize
    return {kind: min(gib * GiB, im2col) for kind, gib in CUDNN_WORKSPACE_GIB.items()}


def parse_vram(text: str) -> float:
    """``24GB``, ``24GiB``, ``24`` (GiB), ``24000MB``, or a card name of :data:`CARDS` -> GiB."""
    if text in CARDS:
        return CARDS[text]
    for name, gib in CARDS.items():
        if text.lower().replace("-", "").replace("_", "") == name.lower().replace("-", ""):
            return gib
    m = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}; give e.g. 24GB, 16000MB or a card "
                         f"name ({', '.join(CARDS)})")
    value, unit = float(m.group(1)), (m.group(2) or "gb")
    return value / 1024 if unit.startswith("m") else value



def default_capability(cfg: Config) -> Tuple[int, int]:
    """This process's CUDA device when ``cfg`` runs on it, else :data:`DEFAULT_CAPABILITY`."""
    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", 0)))
    return DEFAULT_CAPABILITY



def cuda_vram_gib() -> Optional[float]:
    """Memory of this process's CUDA device (GiB), or None without one."""
    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", 0))
    return torch.cuda.get_device_properties(index).total_memory / GiB
