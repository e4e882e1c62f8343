"""Analytic validation: does the trainer sample the reward-tilted distribution?

A two-dimensional stand-in for "pretrained diffusion model + reward" in which everything the trainer
should converge to is known in closed form:

* Data: an isotropic Gaussian mixture ``p(x) = Σ_k w_k N(μ_k, s_k² I)`` in ``D = 2``.  Under the SD 1.5
  noise schedule its noised marginals are ``q_t = Σ_k w_k N(√ᾱ_t μ_k, (ᾱ_t s_k² + 1 - ᾱ_t) I)``, so the
  *exact* noise prediction is ``ε*(x, t) = -√(1-ᾱ_t) ∇ log q_t(x)`` (:class:`ExactEps`).  It is the
  "pretrained model"; the project's own DDPM sampler (:func:`~lowmem_nablagfn.sampling.sample` with
  ``make_schedule('ddim', T, eta=1)``) runs it.
* Reward: linear, ``R(x) = a·x``.  The tilted target ``p(x) exp(β R(x)) / Z`` is again a mixture:
  component ``k`` moves to ``μ_k + β s_k² a`` and its weight becomes
  ``∝ w_k exp(β a·μ_k + ½ β² s_k² |a|²)`` (:meth:`GaussianMixture.tilt`).
* Policy (the LoRA analogue): ``ε_θ(x, t) = ε*(x, t) + c(t) MLP_θ(x, emb(t))`` with a zero-initialised
  last layer, so training starts exactly at the pretrained model, and a fixed per-timestep output
  scale ``c(t)`` for conditioning (:class:`ResidualEps`).  The flow model ``g_φ(x, t)`` is a second MLP
  with a zero-initialised last layer (:class:`FlowMLP`).

Three finetuning methods run on it (:func:`train`):

* ``nabla_db`` — residual ∇-DB exactly as ALGORITHM.md specifies, through the library's own functions:
  :func:`~lowmem_nablagfn.diffusion.step_mean`, :func:`~lowmem_nablagfn.diffusion.forward_score`,
  :func:`~lowmem_nablagfn.diffusion.reverse_score` (first order, policy and reference),
  :func:`~lowmem_nablagfn.diffusion.pred_x0` with the *current* policy for the reward score, and
  :func:`~lowmem_nablagfn.objective.nabla_db_loss` (trust-region reg included).  Transitions are
  picked with :func:`lowmem_nablagfn.subsample.draw_indices` before sampling (select-before-sample).
* ``no_flow`` — the same with ``flow_next=None`` (forward-only mode).
* ``draft`` — a reward-maximising baseline (DRaFT-K / ReFL style): back-propagate ``-mean R(x_0)``
  through the sampler's last ``draft_steps`` steps; no KL, no trust region.

The epoch structure follows the trainer: each epoch samples ``num_traj`` trajectories without grad
and trains on them in ``batches_per_epoch`` optimiser steps (AdamW, gradient clipping at 1.0 per
parameter group).  By default the data are one epoch old (``on_policy=False``, the official
one-epoch lag, so ``ε_sampled`` of the trust region is the previous epoch's policy); ``on_policy=True``
trains on the epoch's own samples.  Settings that differ from the trainer's defaults, and why, are
documented on :class:`AnalyticConfig` (T = 50, λ_rev = 300, λ_reg = 1, K = T, 32 optimiser steps per
epoch, lr 3e-3 with cosine decay).

What ∇-DB converges to.  The trainer tilts the *reference sampler's chain*, so its target is
``p_sampler(x_0) exp(β w(ᾱ_0) R(x_0))`` where ``p_sampler`` is the T-step DDPM output of the exact
model — not the data mixture.  Three gaps to the closed form, smallest first:

1. the terminal tilt is ``β w(ᾱ_0)`` (``w(ᾱ_0) ≈ 0.99915`` for SD), which :func:`target_mixture` uses;
2. ``x_T ~ N(0, I)`` is not tilted (an exact Doob transform would tilt it): a Monte-Carlo Doob
   transform of the DDPM-20 chain gives mode mass 0.785 without and 0.787 with tilting ``x_T``;
3. DDPM-T is not the data distribution (at T = 20 the mode spread is 0.22–0.26 instead of 0.3): its
   exact tilt (:func:`sampler_tilted_samples`, importance resampling) has mode mass ≈ 0.79 vs 0.80 and
   an MMD of ≈ 0.19 to the closed form at T = 20 — the floor of every method's MMD column; T = 50 (the
   paper's step count, the default here) shrinks both.

Convergence.  Only the flow learns from the reverse term (the policy's reverse score is first order),
and the forward term pulls ``g_φ(x_{t-1})`` back toward the *current* policy's shift while the
reverse term pulls ``g_φ(x_t)`` toward the shift the next step needs: with the trainer's λ_rev = 1
the flow follows the lagging policy and the tilt propagates from low to high noise (one step per
fit) very slowly.  Measured (T = 50, 300 epochs x 256 trajectories, 32 steps/epoch, seed 0): mode
mass 0.743 / 0.759 / 0.778 / 0.794 at λ_rev = 10 / 30 / 100 / 300 against the exact 0.800 (seed 1 at
λ_rev = 100: 0.775); at T = 20, λ_rev = 10 and 8
steps/epoch the earlier default stalled at 0.715 for as long as it was run, which is why this was
first mistaken for a fixed-point bias.  The fixed point does not depend on λ_rev (both terms vanish
there), so the benchmark uses λ_rev = 300.

Evaluation (:func:`evaluate`): per-mode mass (nearest component mean of the tilted target), an RBF-MMD
against exact samples of the closed-form tilted target and against samples of the tilted reference
sampler, and the mean reward.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .diffusion import (SD_SCHEDULER_CONFIG, StepSchedule, forward_score, make_schedule, pred_x0,
                        reverse_score, reward_weight, step_mean)
from .objective import nabla_db_loss
from .sampling import sample
from .subsample import draw_indices

METHODS = ("nabla_db", "no_flow", "draft")


# ----------------------------------------------------------------------------- the exact model


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

    def noised(self, alpha: Tensor) -> Tuple[Tensor, Tensor]:
        """Means (N, K, D) and variances (N, K) of ``q_t`` for per-row ``ᾱ`` (N,)."""
        a = alpha.to(torch.float64).view(-1, 1, 1)
        means = a.sqrt() * self.means.unsqueeze(0)
        var = a.view(-1, 1) * self.stds.unsqueeze(0) ** 2 + (1 - a.view(-1, 1))
        return means, var

    def _component_terms(self, x: Tensor, alpha: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        means, var = self.noised(alpha)
        diff = x.to(torch.float64).unsqueeze(1) - means  # (N, K, D)
        d = self.dim
        logp = (self.weights.log().unsqueeze(0) - 0.5 * (diff**2).sum(-1) / var
                - 0.5 * d * torch.log(2 * math.pi * var))
        return logp, diff, var

    def log_prob(self, x: Tensor, alpha: Optional[Tensor] = None) -> Tensor:
        """``log q_t(x)`` (N,) at per-row ``ᾱ`` (``None``: the data, ᾱ = 1). Differentiable in x."""
        if alpha is None:
            alpha = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        logp, _, _ = self._component_terms(x, alpha)
        return torch.logsumexp(logp, dim=1)

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

    The choice only conditions the optimisation (same function class up to a fixed scale per
    timestep).  It matters: the forward score reacts to ``ε`` with gain ``|c_eps|/σ²``, which grows
    from 1.3 at high noise to 49 at the last and 134 at the second-to-last DDPM-20 step of the SD
    schedule (the jump from ᾱ = 0.95 to 0.998), so with ``eps`` the late steps dominate the
    (Adam-normalised) updates of the shared weights and the high-noise steps, which decide the mode
    masses, barely train; ``score`` leaves only the second-to-last step out of line (gain ~30);
    ``mean`` makes the gain 1 on every step.
    """

    def __init__(self, exact: ExactEps, hidden: int = 128, depth: int = 3, param: str = "mean",
                 sched: Optional[StepSchedule] = None):
        super().__init__()
        if param not in RESIDUAL_PARAMS:
            raise ValueError(f"unknown residual parametrisation {param!r}; choose one of {RESIDUAL_PARAMS}")
        self.exact = exact
        self.param = param
        self.residual = MLP(exact.mixture.dim, hidden, depth)
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
        res = self.out_scale[t.long()].to(x.dtype).unsqueeze(-1) * self.residual(x, t)
        return self.exact(x, t) + res


class FlowMLP(MLP):
    """The residual log-flow score model ``g_φ(x, t)`` (zero at init)."""


@dataclass(frozen=True)
class LinearReward:
    """``R(x) = a·x`` (log-reward), ``∇R = a``."""

    direction: Tuple[float, ...]

    def __call__(self, x: Tensor) -> Tensor:
        return x @ torch.as_tensor(self.direction, dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------- configuration


@dataclass
class AnalyticConfig:
    """One analytic experiment.  Defaults: the benchmark (two modes, 0.5/0.5 → ~0.8/0.2)."""

    weights: Tuple[float, ...] = (0.5, 0.5)
    means: Tuple[Tuple[float, ...], ...] = ((-1.0, 0.0), (1.0, 0.0))
    stds: Tuple[float, ...] = (0.3, 0.3)
    reward_direction: Tuple[float, ...] = (0.8, 0.6)
    reward_scale: float = 0.866
    """β; with the defaults the exact tilted weights are ≈ 0.20 / 0.80 (log-odds ln 4 = β a·Δμ)."""
    num_steps: int = 50
    """The paper's DDPM-50; T = 20 converges to a mode mass ~0.02 lower at the same budget."""
    timestep_fraction: float = 1.0
    """K = T: every transition of a trajectory trains (in the order ``draw_indices`` draws).  With
    K = T/4 the flow needs ~3x more epochs for the same accuracy."""
    low_var_subsampling: bool = True
    reward_adaptive_mode: str = "squared"
    reverse_loss_scale: float = 300.0
    """λ_rev.  300 instead of the trainer's 1: the reverse term is what propagates the flow from low
    to high noise (g_φ(x_t) fits the pulled-back policy shift), the forward term pulls g_φ(x_{t-1})
    back toward the current, lagging policy; the larger λ_rev, the faster the tilt reaches the
    high-noise steps that decide the mode masses (see the module docstring for the measurements).
    The fixed point is the same for every λ_rev > 0."""
    unet_reg_scale: float = 1.0
    """λ_reg.  The trainer's 1e3 is tuned to SD's reward scales (β ≥ 1e3); here the forward loss
    weighs an ε change at high noise by (c_eps/σ²)² ≈ 1.7, so λ_reg = 1e3 would make the trust region
    move the policy ~0.2 % of the way per epoch."""
    num_epochs: int = 300
    num_traj: int = 256
    """Trajectories sampled per epoch."""
    batches_per_epoch: int = 32
    """Optimiser steps per epoch (trajectories split evenly)."""
    on_policy: bool = False
    learning_rate: float = 3e-3
    flow_learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    flow_weight_decay: float = 1e-2
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    final_lr_fraction: float = 0.1
    """Cosine learning-rate decay to this fraction of the initial rate over the run (1.0: constant,
    as the trainer).  Only to shrink the SGD jitter around the fixed point that is being measured."""
    hidden: int = 128
    depth: int = 3
    residual_param: str = "mean"
    """``mean``, ``score`` or ``eps``: the residual's output scale, see :class:`ResidualEps`."""
    draft_steps: int = 5
    """Baseline: steps at the end of the chain the reward gradient flows through."""
    draft_epochs: int = 15
    """Baseline epochs (``draft_batches_per_epoch`` steps of ``num_traj / draft_batches_per_epoch``
    samples each).
    The linear reward is unbounded, so the baseline keeps drifting the longer it runs; this budget
    already gives it about 3x the mean reward of the tilted target."""
    draft_batches_per_epoch: int = 8
    """Baseline optimiser steps per epoch (its budget: 120 steps of 32 samples)."""
    draft_learning_rate: float = 3e-4
    """With 1e-3 (or 40 epochs) the residual's feedback through the chain makes the baseline diverge
    (mean reward 1e19 / NaN): the linear reward is unbounded."""
    draft_residual_param: str = "eps"
    """The baseline's residual parametrisation: the ∇-DB-tuned ``mean`` scale (tiny at the last
    steps, 0.76 at the first) makes reward backprop through the last steps blow the residual up at
    high noise (diverges to NaN within ~20 epochs); a plain ``eps`` residual drifts smoothly."""
    num_eval: int = 4000
    seed: int = 0

    def mixture(self) -> GaussianMixture:
        return GaussianMixture.make(self.weights, self.means, self.stds)

    @property
    def num_blocks(self) -> int:
        return int(self.num_steps * self.timestep_fraction)


def target_mixture(cfg: AnalyticConfig, sched: Optional[StepSchedule] = None) -> GaussianMixture:
    """The exact tilted target with the trainer's effective terminal tilt ``β w(ᾱ_0)``."""
    sched = sched or make_schedule("ddim", cfg.num_steps, eta=1.0)
    w0 = float(reward_weight(sched.alpha_next[-1], cfg.reward_adaptive_mode))
    return cfg.mixture().tilt(cfg.reward_direction, cfg.reward_scale * w0)


# ----------------------------------------------------------------------------- evaluation


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


# ----------------------------------------------------------------------------- training


@contextlib.contextmanager
def single_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation (training ran 15x slower
    with 2 threads than with 1 on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _dummy_cond(n: int) -> Tensor:
    return torch.zeros(n, 1, 1)


def sample_final(eps_model: nn.Module, sched: StepSchedule, n: int, seed: int,
                 chunk: int = 4096) -> Tensor:
    """``x_0`` of ``n`` trajectories of the project's sampler (no grad)."""
    g = torch.Generator().manual_seed(seed)
    dim = _model_dim(eps_model)
    outs = []
    with single_thread():
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            traj = sample(lambda x, t, c: eps_model(x, t), sched, _dummy_cond(b), (dim,), g,
                          keep=torch.full((b, 1), sched.num_steps - 1, dtype=torch.long))
            outs.append(traj.final_latents)
    return torch.cat(outs)


def _model_dim(model: nn.Module) -> int:
    exact = model if isinstance(model, ExactEps) else model.exact
    return exact.mixture.dim


def _clip(params: List[nn.Parameter], max_norm: float) -> None:
    if max_norm > 0 and params:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def nabla_db_batch_loss(policy: ResidualEps, flow: Optional[FlowMLP], sched: StepSchedule,
                        reward: LinearReward, cfg: AnalyticConfig, x: Tensor, x_next: Tensor,
                        eps_sampled: Tensor, step_index: Tensor):
    """Residual ∇-DB (``flow`` given) or no-flow loss of N transitions (rows), ALGORITHM.md "Loss".

    Shapes: x, x_next, eps_sampled (N, D); step_index (N,) long.
    """
    exact = policy.exact
    t = sched.timesteps[step_index]
    t_next = sched.next_timesteps[step_index]
    alpha_cur = sched.alpha_cur[step_index].to(x.dtype)
    alpha_next = sched.alpha_next[step_index].to(x.dtype)
    end = step_index == sched.num_steps - 1
    no_flow = flow is None
    direction = torch.as_tensor(reward.direction, dtype=x.dtype)

    # reference policy: forward score at x_{t-1} (closed form) and, with a flow, the reverse score
    if no_flow:
        with torch.no_grad():
            eps_ref = exact(x, t)
        score_cur_ref = None
    else:
        x_ref = x.detach().requires_grad_(True)
        eps_ref = exact(x_ref, t)
        score_cur_ref = reverse_score(sched, step_index, x_ref, eps_ref, x_next)
        eps_ref = eps_ref.detach()
    score_next_ref = forward_score(sched, step_index, x_next, step_mean(sched, step_index, x, eps_ref))

    # current policy at x_t: ε_θ with its graph to θ (forward score, reg); reverse and reward
    # scores at x_t are first order (autograd to x_t only, detached)
    x_pol = x.detach().requires_grad_(not no_flow)
    eps = policy(x_pol, t)
    score_next = forward_score(sched, step_index, x_next, step_mean(sched, step_index, x, eps))
    if no_flow:
        score_cur = reward_grad_cur = flow_cur = flow_next = None
    else:
        score_cur = reverse_score(sched, step_index, x_pol, eps, x_next, retain_graph=True)
        r_cur = reward(pred_x0(x_pol, eps, alpha_cur.view(-1, 1))).sum()
        (reward_grad_cur,) = torch.autograd.grad(r_cur, x_pol, retain_graph=True)
        flow_cur = flow(x, t)
        flow_next = flow(x_next, t_next)

    # reward score at x_{t-1}: x̂0 of the current policy at the next timestep; x̂0 = x at t = 0
    x_n = x_next.detach().requires_grad_(True)
    with torch.enable_grad():
        eps_n = policy(x_n, t_next)
        r_next = reward(pred_x0(x_n, eps_n, alpha_next.view(-1, 1))).sum()
        (reward_grad_next,) = torch.autograd.grad(r_next, x_n)
    reward_grad_next = torch.where(end.view(-1, 1), direction.expand_as(reward_grad_next),
                                   reward_grad_next)

    return nabla_db_loss(
        score_next=score_next, score_next_ref=score_next_ref, score_cur=score_cur,
        score_cur_ref=score_cur_ref, flow_cur=flow_cur, flow_next=flow_next,
        reward_grad_next=reward_grad_next.detach(),
        reward_grad_cur=None if reward_grad_cur is None else reward_grad_cur.detach(),
        alpha_next=alpha_next, alpha_cur=alpha_cur, end_mask=end, eps=eps,
        eps_sampled=eps_sampled, reward_scale=cfg.reward_scale,
        reverse_loss_scale=0.0 if no_flow else cfg.reverse_loss_scale,
        unet_reg_scale=cfg.unet_reg_scale, reward_adaptive_mode=cfg.reward_adaptive_mode)


def draft_loss(policy: ResidualEps, sched: StepSchedule, reward: LinearReward, n: int,
               grad_steps: int, generator: torch.Generator) -> Tensor:
    """Baseline: ``-mean R(x_0)`` with the gradient through the last ``grad_steps`` sampler steps."""
    dim = _model_dim(policy)
    x = torch.randn(n, dim, generator=generator) * sched.init_noise_sigma
    steps = sched.num_steps
    for j in range(steps):
        with torch.set_grad_enabled(j >= steps - grad_steps):
            rows = torch.full((n,), j, dtype=torch.long)
            eps = policy(x, sched.timesteps[j].expand(n))
            noise = torch.randn(n, dim, generator=generator)
            x = step_mean(sched, rows, x, eps) + float(sched.std[j]) * noise
    return -reward(x).mean()


@dataclass
class TrainResult:
    method: str
    policy: ResidualEps
    flow: Optional[FlowMLP]
    history: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def train(method: str, cfg: AnalyticConfig, sched: Optional[StepSchedule] = None,
          log_every: int = 0, init: Optional[Tuple[ResidualEps, Optional[FlowMLP]]] = None
          ) -> TrainResult:
    """Finetune the residual policy with ``method`` in :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    with single_thread():
        return _train(method, cfg, sched, log_every, init)


def _train(method: str, cfg: AnalyticConfig, sched: Optional[StepSchedule],
           log_every: int, init: Optional[Tuple[ResidualEps, Optional[FlowMLP]]] = None) -> TrainResult:
    sched = sched or make_schedule("ddim", cfg.num_steps, eta=1.0)
    torch.manual_seed(cfg.seed)
    exact = ExactEps(cfg.mixture())
    policy = ResidualEps(exact, cfg.hidden, cfg.depth,
                         cfg.draft_residual_param if method == "draft" else cfg.residual_param, sched)
    reward = LinearReward(tuple(cfg.reward_direction))
    flow = FlowMLP(exact.mixture.dim, cfg.hidden, cfg.depth) if method == "nabla_db" else None
    if init is not None:  # warm start (diagnostics: is a given model a fixed point?)
        policy.load_state_dict(init[0].state_dict())
        if flow is not None and init[1] is not None:
            flow.load_state_dict(init[1].state_dict())
    pol_params = list(policy.residual.parameters())
    flow_params = list(flow.parameters()) if flow is not None else []
    groups = [{"params": pol_params, "weight_decay": cfg.weight_decay,
               "lr": cfg.draft_learning_rate if method == "draft" else cfg.learning_rate}]
    if flow_params:
        groups.append({"params": flow_params, "weight_decay": cfg.flow_weight_decay,
                       "lr": cfg.flow_learning_rate})
    opt = torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=1e-8)
    total = max(cfg.draft_epochs * cfg.draft_batches_per_epoch if method == "draft"
                else cfg.num_epochs * cfg.batches_per_epoch, 1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: cfg.final_lr_fraction + (
        1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    result = TrainResult(method, policy, flow)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    dim = exact.mixture.dim

    if method == "draft":
        per_batch = cfg.num_traj // cfg.draft_batches_per_epoch
        for epoch in range(cfg.draft_epochs):
            for _ in range(cfg.draft_batches_per_epoch):
                opt.zero_grad(set_to_none=True)
                loss = draft_loss(policy, sched, reward, per_batch, cfg.draft_steps, gen)
                loss.backward()
                _clip(pol_params, cfg.max_grad_norm)
                opt.step()
                lr_sched.step()
            result.history.append({"epoch": epoch, "reward": -float(loss.detach())})
            if log_every and epoch % log_every == 0:
                print(f"[draft] epoch {epoch} reward {-float(loss.detach()):.3f}", flush=True)
        result.seconds = time.perf_counter() - start
        return result

    k = cfg.num_blocks
    cond = _dummy_cond(cfg.num_traj)

    def draw(epoch: int):
        # draws of different epochs use disjoint counter ranges (a draw uses at most B*T counters)
        keep = draw_indices(cfg.num_traj, cfg.num_steps, k, cfg.low_var_subsampling,
                            seed=cfg.seed, offset=(epoch + 1) * cfg.num_traj * cfg.num_steps)
        traj = sample(lambda x, t, c: policy(x, t), sched, cond, (dim,), gen, keep=keep)
        return traj, float(reward(traj.final_latents).mean())

    buffer = None if cfg.on_policy else draw(-1)  # the official loop: epoch -1 only samples
    for epoch in range(cfg.num_epochs):
        fresh = draw(epoch)
        traj, mean_reward = fresh if cfg.on_policy else buffer
        buffer = fresh
        order = torch.randperm(cfg.num_traj, generator=gen)
        stats: Dict[str, float] = {}
        for rows in order.chunk(cfg.batches_per_epoch):
            s = traj.step_index.shape[1]
            x = traj.latents[rows].reshape(-1, dim)
            x_next = traj.next_latents[rows].reshape(-1, dim)
            eps_sampled = traj.eps_sampled[rows].reshape(-1, dim)
            j = traj.step_index[rows].reshape(-1)
            assert x.shape[0] == rows.numel() * s
            opt.zero_grad(set_to_none=True)
            terms = nabla_db_batch_loss(policy, flow, sched, reward, cfg, x, x_next, eps_sampled, j)
            terms.loss.backward()
            _clip(pol_params, cfg.max_grad_norm)
            _clip(flow_params, cfg.max_grad_norm)
            opt.step()
            lr_sched.step()
            for name, v in terms.scalars().items():
                stats[name] = stats.get(name, 0.0) + v / cfg.batches_per_epoch
        stats.update(epoch=epoch, reward=mean_reward)
        result.history.append(stats)
        if log_every and epoch % log_every == 0:
            print(f"[{method}] epoch {epoch} " + " ".join(f"{k_}={v:.4g}" for k_, v in stats.items()
                                                          if k_ != "epoch"), flush=True)
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- the experiment


@dataclass
class Row:
    name: str
    metrics: Dict[str, object]
    seconds: float = 0.0
    samples: Optional[Tensor] = None


def sampler_tilted_samples(cfg: AnalyticConfig, sched: StepSchedule, n: int, seed: int,
                           pool: int = 20000) -> Tensor:
    """``n`` samples of ``p_sampler(x_0) exp(β w(ᾱ_0) R(x_0))``, where ``p_sampler`` is the untuned
    T-step sampler's own output distribution (importance resampling of ``pool`` untuned samples).

    This is the terminal distribution that residual ∇-DB actually targets (the reference *chain* is
    what it tilts), up to the untilted ``x_T`` (a Monte-Carlo Doob transform of the default chain
    changes the mode mass by < 0.003).  Its distance to the closed form measures the sampler's
    discretisation error, not the trainer's."""
    x = sample_final(ExactEps(cfg.mixture()), sched, pool, seed).double()
    beta = cfg.reward_scale * float(reward_weight(sched.alpha_next[-1], cfg.reward_adaptive_mode))
    logw = beta * LinearReward(tuple(cfg.reward_direction))(x)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.multinomial(torch.softmax(logw, 0), n, replacement=True, generator=g)
    return x[idx]


def run_experiment(cfg: AnalyticConfig, methods: Sequence[str] = METHODS,
                   log_every: int = 0) -> Tuple[GaussianMixture, List[Row]]:
    """Train each method and evaluate it, the untuned model and exact samples against the exact
    tilted target.  Returns the target and one :class:`Row` per line of the table."""
    sched = make_schedule("ddim", cfg.num_steps, eta=1.0)
    target = target_mixture(cfg, sched)
    reward = LinearReward(tuple(cfg.reward_direction))
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    reference = target.sample(cfg.num_eval, g)
    kyy = kernel_mean(reference, reference)
    sampler_ref = sampler_tilted_samples(cfg, sched, cfg.num_eval, cfg.seed + 11)
    sampler_kyy = kernel_mean(sampler_ref, sampler_ref)

    def row(name: str, samples: Tensor, seconds: float = 0.0) -> Row:
        return Row(name, evaluate(samples, target, reward, reference, kyy, sampler_ref, sampler_kyy),
                   seconds, samples)

    rows = [row("exact tilted target (fresh samples)", target.sample(cfg.num_eval, g))]
    rows.append(row(f"exact tilt of the DDPM-{cfg.num_steps} reference sampler (resampled)",
                    sampler_tilted_samples(cfg, sched, cfg.num_eval, cfg.seed + 3)))
    exact = ExactEps(cfg.mixture())
    rows.append(row("pretrained (untuned)", sample_final(exact, sched, cfg.num_eval, cfg.seed + 7)))
    names = {"nabla_db": "residual ∇-DB", "no_flow": "no-flow (forward only)",
             "draft": f"DRaFT-{cfg.draft_steps} (reward max.)"}
    for method in methods:
        res = train(method, cfg, sched, log_every=log_every)
        with torch.no_grad():
            xs = sample_final(res.policy, sched, cfg.num_eval, cfg.seed + 7)
        rows.append(row(names[method], xs, res.seconds))
    return target, rows


def format_table(target: GaussianMixture, rows: Sequence[Row], untilted: GaussianMixture,
                 reward: LinearReward) -> str:
    exact_mass = "/".join(f"{float(w):.3f}" for w in target.weights)
    prior_mass = "/".join(f"{float(w):.3f}" for w in untilted.weights)
    exact_reward = float(reward(target.mean().unsqueeze(0)).squeeze())
    lines = [
        f"exact tilted per-mode mass {exact_mass} (untilted {prior_mass}); "
        f"exact mean reward {exact_reward:.3f}",
        "",
        "| method | per-mode mass | max mass error | MMD vs exact | MMD vs tilted sampler "
        "| mean reward | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.metrics
        mmd_s = f"{m['mmd_sampler']:.4f}" if "mmd_sampler" in m else "-"
        lines.append(f"| {r.name} | {'/'.join(f'{v:.3f}' for v in m['mass'])} | "
                     f"{m['mass_error']:.3f} | {m['mmd']:.4f} | {mmd_s} | {m['reward']:.3f} | "
                     f"{f'{r.seconds:.0f}' if r.seconds else '-'} |")
    return "\n".join(lines)


def verdict(rows: Sequence[Row], tolerance: float = 0.05) -> Tuple[bool, str]:
    """The analytic-validation acceptance on a :func:`run_experiment` table: residual ∇-DB's per-mode
    mass within ``tolerance`` of the exact tilted weights, a lower MMD than the reward-maximising
    baseline, whose mean reward is at least as high.  Returns (met, one-line explanation)."""
    by = {r.name.split(" ")[0]: r.metrics for r in rows}
    nabla = by.get("residual")
    base = next((r.metrics for r in rows if r.name.startswith("DRaFT")), None)
    if nabla is None or base is None:
        return False, "needs the nabla_db and draft rows"
    checks = [(nabla["mass_error"] <= tolerance,
               f"mass error {nabla['mass_error']:.3f} {'<=' if nabla['mass_error'] <= tolerance else '>'} {tolerance}"),
              (nabla["mmd"] < base["mmd"], f"MMD {nabla['mmd']:.3f} vs baseline {base['mmd']:.3f}"),
              (base["reward"] >= nabla["reward"],
               f"baseline reward {base['reward']:.3f} vs {nabla['reward']:.3f}")]
    met = all(ok for ok, _ in checks)
    return met, ("met" if met else "NOT met") + ": " + "; ".join(text for _, text in checks)


def config_dict(cfg: AnalyticConfig) -> dict:
    return asdict(cfg)


__all__ = ["AnalyticConfig", "ExactEps", "FlowMLP", "GaussianMixture", "LinearReward", "METHODS",
           "ResidualEps", "Row", "TrainResult", "alphas_cumprod_table", "draft_loss", "evaluate",
           "format_table", "kernel_mean", "mmd_rbf", "nabla_db_batch_loss", "run_experiment",
           "sample_final", "sampler_tilted_samples", "target_mixture", "train", "verdict"]
