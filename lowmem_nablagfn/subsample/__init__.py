"""Transition subsampling: the one place that chooses between the reference and a fast kernel.

:func:`select_and_gather` and :func:`gather` run the fused Triton kernel
(:mod:`.triton_kernel`) on CUDA tensors when Triton imports, and the PyTorch reference
(:mod:`.reference`) otherwise; both give identical results. ``LOWMEM_NABLAGFN_SUBSAMPLE`` forces
the choice: ``reference``, ``triton`` (an error where the kernel cannot run), or ``auto``
(default). It is read at every call.

:func:`draw_indices` (the reference, vectorised on any device) is the sibling used at sampling
time to decide ahead which steps to keep; it draws exactly what :func:`select_and_gather` draws
for the same ``(seed, offset)``.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import reference
from .reference import (SubsampleError, check_blocks, draw_indices, num_blocks,  # noqa: F401
                        num_counters, num_kept)

__all__ = ["SubsampleError", "backend", "check_blocks", "draw_indices", "gather", "num_blocks",
           "num_counters", "num_kept", "select_and_gather"]

ENV_VAR = "LOWMEM_NABLAGFN_SUBSAMPLE"
_CHOICES = ("auto", "reference", "triton")
_kernel: Optional[ModuleType] = None
_kernel_error: Optional[str] = None


def _load_kernel() -> Optional[ModuleType]:
    """The kernel module, or None when Triton does not import (imported once, lazily: ~1 s)."""
    global _kernel, _kernel_error
    if _kernel is None and _kernel_error is None:
        try:
            from . import triton_kernel
            _kernel = triton_kernel
        except Exception as exc:  # ImportError, or a broken Triton install failing on import
            _kernel_error = f"{type(exc).__name__}: {exc}"
    return _kernel


def backend(device: torch.device) -> ModuleType:
    """The implementation module (:mod:`.reference` or :mod:`.triton_kernel`) for ``device``."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise SubsampleError(f"{ENV_VAR}={choice!r}; expected one of {', '.join(_CHOICES)}")
    if choice == "reference" or (choice == "auto" and torch.device(device).type != "cuda"):
        return reference
    kernel = _load_kernel()
    if kernel is not None:
        return kernel
    if choice == "triton":
        raise SubsampleError(f"{ENV_VAR}=triton but Triton does not import ({_kernel_error}); "
                             f"install the 'triton' extra or unset {ENV_VAR}")
    return reference


def _device(tensors: Dict[str, Tensor]) -> torch.device:
    return next(iter(tensors.values())).device if tensors else torch.device("cpu")


def gather(tensors: Dict[str, Tensor], indices: Tensor,
           dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
    """Gather ``(B, T, ...)`` tensors at ``indices`` (B, S) into contiguous ``(B, S, ...)``.

    Floating tensors are cast to ``dtype`` when given. See :func:`.reference.gather`.
    """
    return backend(_device(tensors)).gather(tensors, indices, dtype)


def select_and_gather(tensors: Dict[str, Tensor], batch: int, num_steps: int, k: int,
                      low_variance: bool, seed: int, offset: int = 0,
                      dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Draw the trained transitions and gather every per-transition tensor for them.

    Args:
        tensors: name -> (B, T, ...) tensor (latents, next latents, eps, timesteps, ...), all on
            one device, any strides.
        batch: B. num_steps: T. k: K (see :func:`num_blocks`).
        low_variance: one draw per block of T/K steps instead of K distinct uniform draws.
        seed, offset: Philox key and first counter (see :func:`draw_indices`).
        dtype: cast floating tensors to it (e.g. bf16 storage -> fp32 training buffers).

    Returns:
        indices (B, S) long (equal to :func:`draw_indices` with the same arguments), and
        name -> contiguous (B, S, ...) tensor.
    """
    return backend(_device(tensors)).select_and_gather(tensors, batch, num_steps, k, low_variance,
                                                       seed, offset, dtype)
