"""Attention backends (``memory.attention``): sdpa, xformers or the math kernel, checked before any
model is loaded and applied to every attention layer of the diffusers models."""
from __future__ import annotations

import torch


ATTENTION_BACKENDS = ("sdpa", "xformers", "math")


def check_attention_backend(backend: str, device) -> None:
    """Raise a clear error, before any model is loaded, when ``memory.attention`` cannot run here."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"memory.attention={backend!r} is unknown; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend != "xformers":
        return
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        raise ImportError("memory.attention=xformers needs the xformers package, which is not installed: "
                          "pip install xformers (a wheel matching your torch and CUDA), or use "
                          "memory.attention=sdpa (the default; PyTorch's own flash / memory-efficient kernels)")
    if torch.device(device).type != "cuda":
        raise ValueError(f"memory.attention=xformers runs on CUDA only (device is {device}); "
                         f"use memory.attention=sdpa")


class MathSDPAProcessor:
    """A diffusers SDPA processor (default ``AttnProcessor2_0``; SD 3's ``JointAttnProcessor2_0``) with
    ``F.scaled_dot_product_attention`` forced to its math kernel (the attention matrix is materialised
    and, with a graph, kept for the backward)."""

    def __init__(self, inner=None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = inner if inner is not None else AttnProcessor2_0()

    def __call__(self, *args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return self.inner(*args, **kwargs)


def set_attention_backend(modules, backend: str) -> None:
    """Give every attention layer of these diffusers models (UNet or SD 3 transformer, VAE, flow model;
    ``None`` skipped) the processor of ``memory.attention``: ``sdpa`` (diffusers' ``AttnProcessor2_0``;
    SD 3's joint attention ``JointAttnProcessor2_0``), ``xformers`` (``XFormersAttnProcessor`` /
    ``XFormersJointAttnProcessor``) or ``math`` (:class:`MathSDPAProcessor` around the SDPA one)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention_processor import (AttnProcessor2_0, JointAttnProcessor2_0, XFormersAttnProcessor,
                                                      XFormersJointAttnProcessor)

    for module in modules:
        if module is None or not hasattr(module, "set_attn_processor"):
            continue
        joint = isinstance(module, SD3Transformer2DModel)  # text and image tokens attend together
        sdpa, xformers = (JointAttnProcessor2_0, XFormersJointAttnProcessor) if joint else \
            (AttnProcessor2_0, XFormersAttnProcessor)
        make = {"sdpa": sdpa, "xformers": xformers, "math": lambda: MathSDPAProcessor(sdpa())}[backend]
        module.set_attn_processor(make())
