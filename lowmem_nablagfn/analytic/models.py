"""The trainable parts of the analytic validation: the residual policy (the LoRA analogue) on top of
the exact model, and the flow model ``g_φ``; both small time-conditioned MLPs, zero at init."""
from __future__ import annotations

import math
from typing import List, Optional, Union

import torch
from torch import Tensor, nn

from ..diffusion import StepSchedule
from .exact import ExactEps, ExactVelocity


def time_embedding(t: Tensor, num_freqs: int = 6) -> Tensor:
    """(N, 2 num_freqs) sinusoidal features of ``t / 1000``."""
    freqs = (math.pi / 2) * 2.0 ** torch.arange(num_freqs, dtype=torch.float32, device=t.device)
    arg = (t.float() / 1000.0).unsqueeze(-1) * freqs
    return torch.cat([arg.cos(), arg.sin()], dim=-1)


class MLP(nn.Module):
    """``f(x, emb(t))``: an MLP with SiLU and a zero-initialised last layer (output 0 at init)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_freqs: int = 6):
        super().__init__()
        self.num_freqs = num_freqs
        layers: List[nn.Module] = []
        width = dim + 2 * num_freqs
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        return self.net(torch.cat([x, time_embedding(t, self.num_freqs)], dim=-1))


RESIDUAL_PARAMS = ("mean", "score", "eps")


class ResidualEps(nn.Module):
    """The policy: the frozen exact model plus a trainable residual (the LoRA analogue), zero at init:
    ``ε_θ(x, t) = ε*(x, t) + c(t) MLP_θ(x, emb(t))`` with a fixed per-timestep output scale ``c(t)``.

    * ``param="eps"``: ``c = 1``.
    * ``param="score"``: ``c = -√(1-ᾱ_t)``; the MLP adds to the score ``∇ log q_t``.
    * ``param="mean"`` (default): ``c(t_j) = σ_j² / c_eps_j`` at the sampler's timesteps (``-√(1-ᾱ_t)``
      elsewhere), so the MLP output is the shift of the step's forward score, ``Δmean / σ²`` —
      at the ∇-DB optimum that is ``∇ log F̃`` at the next state.

    On a flow-matching model (:class:`ExactVelocity`, the ``flow-sde`` sampler) the residual adds to
    the velocity: ``eps`` is ``c = 1`` and ``mean`` is ``c = σ_j² / c_v_j`` on the sampler's (float)
    timestep grid, looked up at the nearest grid timestep; ``score`` is refused (its scale
    ``-t / (1 - t)`` is infinite at ``t = 1``).

    The choice only conditions the optimisation (same function class up to a fixed scale per
    timestep).  It matters: the forward score reacts to ``ε`` with gain ``|c_eps|/σ²``, which grows
    from 1.3 at high noise to 49 at the last and 134 at the second-to-last DDPM-20 step of the SD
    schedule (the jump from ᾱ = 0.95 to 0.998), so with ``eps`` the late steps dominate the
    (Adam-normalised) updates of the shared weights and the high-noise steps, which decide the mode
    masses, barely train; ``score`` leaves only the second-to-last step out of line (gain ~30);
    ``mean`` makes the gain 1 on every step.
    """

    def __init__(self, exact: Union[ExactEps, ExactVelocity], hidden: int = 128, depth: int = 3,
                 param: str = "mean", sched: Optional[StepSchedule] = None):
        super().__init__()
        if param not in RESIDUAL_PARAMS:
            raise ValueError(f"unknown residual parametrisation {param!r}; choose one of {RESIDUAL_PARAMS}")
        self.exact = exact
        self.param = param
        self.residual = MLP(exact.mixture.dim, hidden, depth)
        self.register_buffer("grid", None)  # flow: the sampler's timesteps the scale is tabled on
        if isinstance(exact, ExactVelocity):
            if param == "score":
                raise ValueError("residual_param='score' has no flow-matching form (its scale -t/(1-t) is "
                                 "infinite at t = 1); use 'mean' or 'eps'")
            if sched is None:
                raise ValueError("a flow-matching residual needs the sampler's StepSchedule (its timestep grid)")
            self.register_buffer("grid", sched.timesteps.to(torch.float64))
            scale = sched.std**2 / sched.c_eps if param == "mean" else torch.ones_like(sched.c_eps)
            self.register_buffer("out_scale", scale)
            return
        scale = torch.ones_like(exact.alphas_cumprod)
        if param in ("score", "mean"):
            scale = -(1 - exact.alphas_cumprod).sqrt()
        if param == "mean":
            if sched is None:
                raise ValueError("param='mean' needs the sampler's StepSchedule")
            scale[sched.timesteps] = sched.std**2 / sched.c_eps
        self.register_buffer("out_scale", scale)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if self.grid is None:
            index = t.long()
        else:  # nearest grid timestep (off the grid only at t = 0, whose outputs are never used)
            index = (t.to(torch.float64).unsqueeze(-1) - self.grid).abs().argmin(-1)
        res = self.out_scale[index].to(x.dtype).unsqueeze(-1) * self.residual(x, t)
        return self.exact(x, t) + res


class FlowMLP(MLP):
    """The residual log-flow score model ``g_φ(x, t)`` (zero at init)."""
