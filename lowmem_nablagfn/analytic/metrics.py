"""Evaluation of samples against the exact tilted target: per-mode mass, RBF-MMD, mean reward."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from .exact import GaussianMixture, LinearReward
from .sampler import single_thread


MMD_BANDWIDTHS = (0.1, 0.25, 0.5, 1.0, 2.0)


def kernel_mean(a: Tensor, b: Tensor, bandwidths: Sequence[float] = MMD_BANDWIDTHS,
                chunk: int = 1024) -> float:
    """``mean_ij Σ_h exp(-|a_i - b_j|²/(2 h²))`` (chunked; kernel values in float32)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    scales = torch.tensor([-0.5 / (h * h) for h in bandwidths], dtype=torch.float32)
    total = 0.0
    with single_thread():
        for start in range(0, a.shape[0], chunk):
            d2 = torch.cdist(a[start:start + chunk], b).square_().float().unsqueeze(-1)
            total += float(torch.exp(d2 * scales).sum(dtype=torch.float64))
    return total / (a.shape[0] * b.shape[0])


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: Sequence[float] = MMD_BANDWIDTHS,
            kyy: Optional[float] = None) -> float:
    """``MMD`` = √(biased MMD²) with a sum of RBF kernels of the ``bandwidths``; ``kyy`` caches
    :func:`kernel_mean` ``(y, y)``."""
    kyy = kernel_mean(y, y, bandwidths) if kyy is None else kyy
    mmd2 = kernel_mean(x, x, bandwidths) + kyy - 2 * kernel_mean(x, y, bandwidths)
    return math.sqrt(max(mmd2, 0.0))


def evaluate(samples: Tensor, target: GaussianMixture, reward: LinearReward,
             reference: Tensor, reference_kyy: Optional[float] = None,
             sampler_reference: Optional[Tensor] = None,
             sampler_kyy: Optional[float] = None) -> Dict[str, object]:
    """Per-mode mass (nearest tilted component mean), max |mass - exact|, MMD vs ``reference``
    (exact samples of ``target``), optionally MMD vs ``sampler_reference`` (samples of the tilted
    reference *sampler*, :func:`sampler_tilted_samples`) as ``mmd_sampler``, and the mean reward."""
    samples = samples.to(torch.float64)
    counts = torch.bincount(target.nearest(samples), minlength=target.num_components)
    mass = counts.double() / samples.shape[0]
    out = {
        "mass": [float(m) for m in mass],
        "mass_error": float((mass - target.weights).abs().max()),
        "mmd": mmd_rbf(samples, reference, kyy=reference_kyy),
        "reward": float(reward(samples).mean()),
    }
    if sampler_reference is not None:
        out["mmd_sampler"] = mmd_rbf(samples, sampler_reference, kyy=sampler_kyy)
    return out
