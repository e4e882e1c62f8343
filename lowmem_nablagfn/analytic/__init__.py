"""Analytic validation: does the trainer sample the reward-tilted distribution?

Layout: :mod:`.exact` (mixture, exact ε, linear reward), :mod:`.models` (residual policy, flow MLP),
:mod:`.config` (:class:`AnalyticConfig`, the exact target), :mod:`.sampler` (sampling the models),
:mod:`.metrics` (mode mass, MMD), :mod:`.training` (the three methods), :mod:`.experiment` (the
table and verdict of ``benchmarks/analytic.py``).

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

Flow matching (``AnalyticConfig.sampler = "flow-sde"``, :func:`flow_matching_config`): the same mixture
under the rectified-flow interpolation ``x_t = (1 - t) x_0 + t ε``, whose exact velocity
``v*(x, t) = E[ε - x_0 | x_t]`` is closed form (:class:`ExactVelocity`), run by the project's flow-sde
sampler (Flow-GRPO's SDE, a = 0.7, SD 3.5's shift-3 grid); the residual adds to the velocity and
everything else — executor, loss, metrics, target — is shared.  Its trust region is rescaled
(λ_reg = 2e-4): see :func:`flow_matching_config`.  Measured (T = 50, the benchmark's budget, seed 0):
mode mass 0.234/0.766 against the exact 0.200/0.800 (0.603 with λ_reg = 1).

Three finetuning methods run on it (:func:`train`):

* ``nabla_db`` — residual ∇-DB exactly as the trainer runs it: the sampled transitions become
  :class:`~lowmem_nablagfn.memory.Rows` with the trainer's batch divisors (:meth:`Rows.norms`), and
  the production executor and loss (:func:`~lowmem_nablagfn.memory.accumulate_gradients`,
  :func:`~lowmem_nablagfn.objective.nabla_db_loss`, trust-region reg included) train the analytic
  models through plain callables (:func:`~.training.update_context`).  Transitions are picked with
  :func:`lowmem_nablagfn.subsample.draw_indices` before sampling (select-before-sample).
* ``no_flow`` — the same with no flow model (forward-only mode).
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
from .config import AnalyticConfig, flow_matching_config, target_mixture
from .exact import ExactEps, ExactVelocity, GaussianMixture, LinearReward, alphas_cumprod_table
from .experiment import Row, config_dict, format_table, run_experiment, sampler_label, verdict
from .metrics import MMD_BANDWIDTHS, evaluate, kernel_mean, mmd_rbf
from .models import MLP, RESIDUAL_PARAMS, FlowMLP, ResidualEps, time_embedding
from .sampler import sample_final, sampler_tilted_samples, single_thread
from .training import METHODS, TrainResult, accumulate_update, draft_loss, train, update_context

__all__ = ["AnalyticConfig", "ExactEps", "ExactVelocity", "FlowMLP", "GaussianMixture", "LinearReward",
           "METHODS", "MLP", "MMD_BANDWIDTHS", "RESIDUAL_PARAMS", "ResidualEps", "Row", "TrainResult",
           "accumulate_update", "alphas_cumprod_table", "config_dict", "draft_loss", "evaluate",
           "flow_matching_config", "format_table", "kernel_mean", "mmd_rbf", "run_experiment", "sample_final",
           "sampler_label", "sampler_tilted_samples", "single_thread", "target_mixture", "time_embedding", "train",
           "update_context", "verdict"]
