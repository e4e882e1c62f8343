"""The closed-form side of the analytic validation: the data mixture, its exact noise prediction
(the "pretrained model"; :class:`ExactVelocity` for flow matching), the linear reward and the noise
schedule's ``ᾱ`` table."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..diffusion import SD_SCHEDULER_CONFIG


def alphas_cumprod_table(scheduler_config: Optional[dict] = None) -> Tensor:
    """(1000,) float64 ``ᾱ`` of the noise schedule (SD 1.5 by default), indexed by UNet timestep."""
    from diffusers import DDPMScheduler

    cfg = dict(scheduler_config or SD_SCHEDULER_CONFIG)
    return DDPMScheduler.from_config(cfg).alphas_cumprod.to(torch.float64)


@dataclass(frozen=True)
class GaussianMixture:
    """``Σ_k w_k N(μ_k, s_k² I)``: weights (K,), means (K, D), stds (K,) (float64)."""

    weights: Tensor
    means: Tensor
    stds: Tensor

    @staticmethod
    def make(weights: Sequence[float], means: Sequence[Sequence[float]],
             stds: Sequence[float]) -> "GaussianMixture":
        w = torch.as_tensor(weights, dtype=torch.float64)
        return GaussianMixture(w / w.sum(), torch.as_tensor(means, dtype=torch.float64),
                               torch.as_tensor(stds, dtype=torch.float64))

    @property
    def num_components(self) -> int:
        return int(self.weights.numel())

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def noised(self, alpha: Tensor, noise_var: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Means (N, K, D) and variances (N, K) of ``q_t`` of ``x_t = √ᾱ x_0 + n ε`` for per-row ``ᾱ``
        (N,) and noise variance ``n²`` (N,) (None: ``1 - ᾱ``, the DDPM schedule; rectified flow
        ``x_t = (1 - t) x_0 + t ε``: ``ᾱ = (1 - t)²``, ``n² = t²``)."""
        a = alpha.to(torch.float64).view(-1, 1, 1)
        n2 = (1 - a.view(-1, 1)) if noise_var is None else noise_var.to(torch.float64).view(-1, 1)
        means = a.sqrt() * self.means.unsqueeze(0)
        var = a.view(-1, 1) * self.stds.unsqueeze(0) ** 2 + n2
        return means, var

    def _component_terms(self, x: Tensor, alpha: Tensor,
                         noise_var: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        means, var = self.noised(alpha, noise_var)
        diff = x.to(torch.float64).unsqueeze(1) - means  # (N, K, D)
        d = self.dim
        logp = (self.weights.log().unsqueeze(0) - 0.5 * (diff**2).sum(-1) / var
                - 0.5 * d * torch.log(2 * math.pi * var))
        return logp, diff, var

    def log_prob(self, x: Tensor, alpha: Optional[Tensor] = None, noise_var: Optional[Tensor] = None) -> Tensor:
        """``log q_t(x)`` (N,) at per-row ``ᾱ`` (``None``: the data, ᾱ = 1) and noise variance (see
        :meth:`noised`). Differentiable in x."""
        if alpha is None:
            alpha = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        logp, _, _ = self._component_terms(x, alpha, noise_var)
        return torch.logsumexp(logp, dim=1)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """Closed-form rectified-flow velocity ``v*(x, t) = E[ε - x_0 | x_t = x]`` (N, D), float64, of
        ``x_t = (1 - t) x_0 + t ε`` at per-row ``t`` (N,) in [0, 1].  Per component ``k`` (variance
        ``V_k = (1-t)² s_k² + t²``, ``d_k = x - (1-t) μ_k``): ``E[ε | x, k] = t d_k / V_k`` and
        ``E[x_0 | x, k] = μ_k + (1-t) s_k² d_k / V_k``, weighted by the responsibilities — finite at
        ``t = 1`` (``x - mean``) and ``t = 0`` (``-x``).  Differentiable in x."""
        t = t.to(torch.float64)
        logp, diff, var = self._component_terms(x, (1 - t) ** 2, t**2)  # diff = d_k (N, K, D)
        resp = torch.softmax(logp, dim=1).unsqueeze(-1)
        gain = (t.view(-1, 1) - (1 - t).view(-1, 1) * self.stds.unsqueeze(0) ** 2) / var  # (N, K)
        return (resp * (gain.unsqueeze(-1) * diff - self.means.unsqueeze(0))).sum(1)

    def score(self, x: Tensor, alpha: Tensor) -> Tensor:
        """Closed-form ``∇_x log q_t(x)`` (N, D), float64."""
        logp, diff, var = self._component_terms(x, alpha)
        resp = torch.softmax(logp, dim=1)  # (N, K)
        return -(resp.unsqueeze(-1) * diff / var.unsqueeze(-1)).sum(1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Exact samples (n, D), float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp].unsqueeze(-1) * noise

    def tilt(self, direction: Sequence[float], beta: float) -> "GaussianMixture":
        """The mixture ``∝ p(x) exp(β a·x)`` (closed form)."""
        a = torch.as_tensor(direction, dtype=torch.float64)
        s2 = self.stds**2
        logw = self.weights.log() + beta * (self.means @ a) + 0.5 * beta**2 * s2 * (a @ a)
        return GaussianMixture(torch.softmax(logw, 0), self.means + beta * s2.unsqueeze(-1) * a, self.stds)

    def log_flow(self, x: Tensor, alpha: Tensor, direction: Sequence[float], beta: float) -> Tensor:
        """``log E[exp(β a·x_0) | x_t = x]`` (N,) under the noising process (continuous-time Doob
        h-function of the tilt); its gradient is what ``g_φ + s_R`` should learn.  Differentiable."""
        a = torch.as_tensor(direction, dtype=torch.float64)
        logp, diff, var = self._component_terms(x, alpha)  # diff = x - √ᾱ μ_k
        sa = alpha.to(torch.float64).sqrt().view(-1, 1)
        s2 = self.stds.unsqueeze(0) ** 2
        post_mean = self.means.unsqueeze(0) + (sa * s2 / var).unsqueeze(-1) * diff  # (N, K, D)
        post_var = s2 * (1 - alpha.to(torch.float64).view(-1, 1)) / var
        log_resp = torch.log_softmax(logp, dim=1)
        return torch.logsumexp(log_resp + beta * post_mean @ a + 0.5 * beta**2 * (a @ a) * post_var, 1)

    def mean(self) -> Tensor:
        return (self.weights.unsqueeze(-1) * self.means).sum(0)

    def nearest(self, x: Tensor) -> Tensor:
        """Index (N,) of the nearest component mean."""
        return torch.cdist(x.to(torch.float64), self.means).argmin(1)


class ExactEps(nn.Module):
    """``ε*(x, t) = -√(1-ᾱ_t) ∇ log q_t(x)`` of a :class:`GaussianMixture`; differentiable in ``x``.

    ``t`` is the (N,) long UNet timestep; ``ᾱ`` comes from ``alphas_cumprod``.  Computed in float64,
    returned in ``x``'s dtype.
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: Optional[Tensor] = None):
        super().__init__()
        self.mixture = mixture
        self.register_buffer("alphas_cumprod",
                             alphas_cumprod if alphas_cumprod is not None else alphas_cumprod_table())

    def alpha(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod[t.long()]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        alpha = self.alpha(t.expand(x.shape[0]) if t.dim() == 0 else t)
        eps = -(1 - alpha).sqrt().unsqueeze(-1) * self.mixture.score(x, alpha)
        return eps.to(x.dtype)


class ExactVelocity(nn.Module):
    """The flow-matching "pretrained model" of a :class:`GaussianMixture`: the exact velocity
    ``v*(x, t)`` (:meth:`GaussianMixture.velocity`) at the model timestep ``t`` = 1000 × the
    flow-matching sigma (float, as SD 3.x's transformer takes it).  Computed in float64, returned in
    ``x``'s dtype; differentiable in ``x``."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        return self.mixture.velocity(x, t.to(torch.float64) / 1000.0).to(x.dtype)


@dataclass(frozen=True)
class LinearReward:
    """``R(x) = a·x`` (log-reward), ``∇R = a``."""

    direction: Tuple[float, ...]

    def __call__(self, x: Tensor) -> Tensor:
        return x @ torch.as_tensor(self.direction, dtype=x.dtype, device=x.device)
