"""One analytic experiment's settings (:class:`AnalyticConfig`) and its exact tilted target."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..diffusion import FLOW_SAMPLERS, StepSchedule, make_schedule, reward_weight
from .exact import ExactEps, ExactVelocity, GaussianMixture


@dataclass
class AnalyticConfig:
    """One analytic experiment.  Defaults: the benchmark (two modes, 0.5/0.5 → ~0.8/0.2)."""

    weights: Tuple[float, ...] = (0.5, 0.5)
    means: Tuple[Tuple[float, ...], ...] = ((-1.0, 0.0), (1.0, 0.0))
    stds: Tuple[float, ...] = (0.3, 0.3)
    reward_direction: Tuple[float, ...] = (0.8, 0.6)
    reward_scale: float = 0.866
    """β; with the defaults the exact tilted weights are ≈ 0.20 / 0.80 (log-odds ln 4 = β a·Δμ)."""
    sampler: str = "ddim"
    """``ddim`` (DDPM: DDIM with eta = 1, the SD 1.5 schedule, exact ε*) or ``flow-sde`` (flow
    matching: rectified flow with SD 3.5's shift 3 grid, exact velocity v*, Flow-GRPO's SDE with
    noise level ``noise_level``)."""
    noise_level: float = 0.7
    """flow-sde's ``a`` (Flow-GRPO's default); unused by ``ddim``."""
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
    def flow_matching(self) -> bool:
        return self.sampler in FLOW_SAMPLERS

    def schedule(self) -> StepSchedule:
        """The sampler's schedule: DDPM-T on SD 1.5's, or flow-sde-T on SD 3.5's flow-matching grid."""
        return make_schedule(self.sampler, self.num_steps, eta=self.noise_level if self.flow_matching else 1.0)

    def exact_model(self) -> "ExactEps | ExactVelocity":
        """The "pretrained model": the mixture's exact ε* (DDPM) or velocity v* (flow matching)."""
        return ExactVelocity(self.mixture()) if self.flow_matching else ExactEps(self.mixture())

    @property
    def num_blocks(self) -> int:
        return int(self.num_steps * self.timestep_fraction)


def flow_matching_config(**overrides) -> AnalyticConfig:
    """The flow-matching case (``benchmarks/analytic.py --sampler flow-sde``): the benchmark's settings
    with ``sampler="flow-sde"`` and the trust region rescaled to velocities.  ``reg`` compares model
    outputs, and the forward score reacts to a velocity change with gain ``|c_v| / std² = (1 + a²/2) / σ_t²``,
    0.014 at the first step of flow-SDE-50 on SD 3.5's grid (``σ_t² ≈ 65``) where ε's gain is 1.13 at
    DDPM-50's: at λ_reg = 1 the trust region outweighs the forward term ~5000x there and the high-noise
    steps, which decide the mode masses, barely move (measured: mode mass 0.603 of 0.800 after the full
    run).  λ_reg = 2e-4 gives the trust region about the weight relative to the forward term that
    λ_reg = 1 has at DDPM's first step."""
    return AnalyticConfig(**{"sampler": "flow-sde", "unet_reg_scale": 2e-4, **overrides})


def target_mixture(cfg: AnalyticConfig, sched: Optional[StepSchedule] = None) -> GaussianMixture:
    """The exact tilted target with the trainer's effective terminal tilt ``β w(ᾱ_0)`` (flow: w = 1)."""
    sched = sched or cfg.schedule()
    w0 = float(reward_weight(sched.alpha_next[-1], cfg.reward_adaptive_mode))
    return cfg.mixture().tilt(cfg.reward_direction, cfg.reward_scale * w0)
