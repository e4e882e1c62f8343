"""Per-step Gaussian transitions of the supported samplers, and the scores of docs/algorithm.md.

Both samplers are, step by step, a Gaussian whose mean is *linear* in the current latent and the
(guided) noise prediction::

    x_{t-1} ~ N(c_x[j] * x_t + c_eps[j] * eps(x_t),  std[j]^2)

DDPM (DDIM with eta = 1)::

    x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    var = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)
    mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - var) eps

First-order SDE-DPM-Solver++ (sigma_s -> sigma_t, VP alpha/sigma from the solver's sigmas,
h = lambda_t - lambda_s)::

    mean = (sigma_t / sigma_s) e^{-h} x_t + alpha_t (1 - e^{-2h}) x0,   std = sigma_t sqrt(1 - e^{-2h})

Flow-GRPO's SDE sampler for flow-matching models (SD 3.x; ``x_t = (1 - t) x0 + t ε``, the model
predicts the velocity ``v = ε - x0``; ``t`` = the scheduler's sigma, ``dt = t_next - t < 0``,
noise level ``a``, ``σ_t = a √(t / (1 - t))``)::

    mean = x + [v + σ_t² / (2t) (x + (1 - t) v)] dt,   std = σ_t √(-dt)

i.e. ``c_x = 1 + σ_t² dt / (2t)``, ``c_v = dt (1 + σ_t² (1 - t) / (2t))``; at ``a = 0`` it is the Euler
step of ``FlowMatchEulerDiscreteScheduler`` (docs/algorithm.md, "Flow matching (SD 3.5)").  For flow
models the "noise prediction" of the code below is the velocity: the mean is linear in it.

So one code path gives the forward score (closed form) and the reverse score (one vector-Jacobian
product through the noise model) for every sampler.  ``x̂0`` is linear too,
``x̂0 = x0_x x + x0_eps eps`` (DDPM: ``(x - √(1-ᾱ) ε) / √ᾱ``; flow: ``x - t v``), and the reward
weight reads ``alpha_cur`` / ``alpha_next``: ``ᾱ`` for DDPM, its analogue ``(1 - t)²`` (the squared
signal coefficient) for flow.  Timesteps and alphas come from the diffusers
schedulers themselves, built from the loaded model's own scheduler config (betas, spacing, offset),
so the step grid is exactly the one the model's pipeline uses.

Prediction types (``scheduler_config["prediction_type"]``): ``epsilon`` (SD 1.x) and ``v_prediction``
(SD 2.x 768 px).  A v-model's output is turned into the noise prediction the math above uses,
``ε = √ᾱ_t v + √(1-ᾱ_t) x_t`` (:func:`as_epsilon`; then ``x̂0 = √ᾱ_t x_t - √(1-ᾱ_t) v`` follows), before
anything else sees it; CFG commutes with that affine map.  Anything else is refused
(:func:`check_scheduler_config`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

#: Stable Diffusion 1.x noise schedule (also the default scheduler config of the presets).
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

#: Stable Diffusion 3.5's flow-matching scheduler (``FlowMatchEulerDiscreteScheduler``, static shift 3).
SD3_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}

#: The samplers of each family of schedules: DDPM-type (betas) and flow matching (sigmas with a shift).
VP_SAMPLERS = ("ddim", "dpm-solver")
FLOW_SAMPLERS = ("flow-sde",)
SAMPLERS = VP_SAMPLERS + FLOW_SAMPLERS
#: Prediction types of DDPM-type schedulers; a flow-matching config is ``flow_prediction`` by its class.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def is_flow_matching(scheduler_config: dict) -> bool:
    """Whether a scheduler config is a flow-matching one (``FlowMatchEulerDiscreteScheduler``: a
    ``shift`` and no betas), i.e. the model predicts the velocity ``ε - x0``."""
    if str(scheduler_config.get("_class_name", "")).startswith("FlowMatch"):
        return True
    return "shift" in scheduler_config and "beta_start" not in scheduler_config


def check_scheduler_config(scheduler_config: dict, source: str = "the model") -> str:
    """The model's prediction type, or a ``ValueError`` naming what is unsupported and why.

    A flow-matching config (:func:`is_flow_matching`) is ``flow_prediction`` (the velocity)."""
    if is_flow_matching(scheduler_config):
        return "flow_prediction"
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{source} predicts {kind!r} (scheduler config prediction_type); the trainer supports "
                         f"{' and '.join(PREDICTION_TYPES)} (SD 1.x / SD 2.x) with a DDPM-type (betas) scheduler, "
                         f"and flow matching (SD 3.x: a FlowMatchEulerDiscreteScheduler config with a shift): the "
                         f"Gaussian transition and its scores are written in terms of the noise prediction or the "
                         f"velocity. Use an epsilon or v-prediction model, or a flow-matching one")
    return kind


@dataclass(frozen=True)
class StepSchedule:
    """Per-step scalars of a Gaussian sampler with ``T`` steps (index ``j = 0 … T-1``).

    ``eps`` below is the model output the step is written in: the noise prediction (DDPM, DPM;
    v-prediction converted by :func:`as_epsilon`) or the velocity (``flow-sde``).

    Attributes:
        name: ``"ddim"``, ``"dpm-solver"`` or ``"flow-sde"``.
        timesteps: (T,) the model's timestep at ``x_t``: long for DDPM/DPM (981 … 1 for DDIM-50);
            float32 ``1000 t`` for flow (1000.0 … , as ``StableDiffusion3Pipeline`` passes it).
        next_timesteps: (T,) the timestep of ``x_{t-1}`` (same dtype); 0 after the last step.
        c_x, c_eps, std: (T,) float64, mean = c_x x + c_eps eps, standard deviation.
        alpha_cur, alpha_next: (T,) float64, ``ᾱ`` at ``timesteps`` / ``next_timesteps`` — what the
            reward weight ``w(ᾱ)`` reads; flow: the analogue ``(1 - t)²``.
        init_noise_sigma: scale of the initial noise.
        scheduler_config: the diffusers scheduler config (for pipelines built from it).
        prediction_type: what the model predicts (``epsilon``, ``v_prediction``, ``flow_prediction``).
        alphas_cumprod: (num_train_timesteps,) float64, ``ᾱ`` of every training timestep (DDPM/DPM).
        x0_x_cur, x0_eps_cur, x0_x_next, x0_eps_next: (T,) float64, ``x̂0 = x0_x x + x0_eps eps`` at
            ``x_t`` / ``x_{t-1}`` (:meth:`pred_x0`).
        sigmas: (T + 1,) float64 flow-matching ``t`` of every state (flow only; ``sigmas[T] = 0``).
        noise_level: flow-sde's ``a`` (None for DDPM/DPM).
    """

    name: str
    timesteps: Tensor
    next_timesteps: Tensor
    c_x: Tensor
    c_eps: Tensor
    std: Tensor
    alpha_cur: Tensor
    alpha_next: Tensor
    init_noise_sigma: float
    scheduler_config: dict
    prediction_type: str = "epsilon"
    alphas_cumprod: Optional[Tensor] = None
    x0_x_cur: Optional[Tensor] = None
    x0_eps_cur: Optional[Tensor] = None
    x0_x_next: Optional[Tensor] = None
    x0_eps_next: Optional[Tensor] = None
    sigmas: Optional[Tensor] = None
    noise_level: Optional[float] = None

    def to_epsilon(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The output the step is written in (ε; flow: the velocity itself) of a model output ``out``
        at ``x`` (N, C, H, W), timesteps ``t`` (N,)."""
        if self.prediction_type != "v_prediction":
            return out
        a = self.alphas_cumprod.to(x.device)[t.to(x.device).long()].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return a.sqrt() * out + (1 - a).sqrt() * x

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def gather(self, name: str, step_index: Tensor, like: Tensor) -> Tensor:
        """Per-row value of a per-step field, shaped to broadcast against ``like`` (N, C, H, W)."""
        values = getattr(self, name).to(like.device)[step_index.to(like.device)]
        return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def pred_x0(self, step_index: Tensor, x: Tensor, eps: Tensor, nxt: bool = False) -> Tensor:
        """Predicted clean latent ``x̂0 = x0_x x + x0_eps eps`` of the state ``x`` at ``x_t`` of step
        ``step_index`` (or at its ``x_{t-1}``, ``nxt``); ``eps`` is the model output at ``x``.
        Shapes: x, eps (N, C, H, W); step_index (N,)."""
        which = "next" if nxt else "cur"
        return self.gather(f"x0_x_{which}", step_index, x) * x + self.gather(f"x0_eps_{which}", step_index, x) * eps


def _alphas_cumprod(scheduler_config: dict) -> Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.to(torch.float64)


def _vp_x0(alpha: Tensor) -> tuple:
    """``x̂0 = (x - √(1-ᾱ) ε) / √ᾱ`` as (coefficient of x, coefficient of ε)."""
    return 1 / alpha.sqrt(), -(1 - alpha).sqrt() / alpha.sqrt()


def ddim_schedule(scheduler_config: dict, num_steps: int, eta: float = 1.0) -> StepSchedule:
    """DDIM with stochasticity ``eta`` (1.0 = DDPM), SD's "leading" timestep spacing."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(num_steps)
    ac = sched.alphas_cumprod.to(torch.float64)
    final = torch.tensor(float(sched.final_alpha_cumprod), dtype=torch.float64)
    t = sched.timesteps.long()
    stride = sched.config.num_train_timesteps // num_steps
    prev = t - stride
    a_t = ac[t]
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    var = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    c_x = a_prev.sqrt() / a_t.sqrt()
    c_eps = (1 - a_prev - var).sqrt() - a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()
    next_t = prev.clamp(min=0)
    return StepSchedule("ddim", t, next_t, c_x, c_eps, var.sqrt(), a_t, ac[next_t],
                        float(sched.init_noise_sigma), dict(sched.config),
                        check_scheduler_config(scheduler_config), ac, *_vp_x0(a_t), *_vp_x0(ac[next_t]))


def sde_dpmpp1_schedule(scheduler_config: dict, num_steps: int) -> StepSchedule:
    """First-order SDE-DPM-Solver++ with ``final_sigmas_type="sigma_min"``."""
    from diffusers import DPMSolverSinglestepScheduler

    cfg = {k: v for k, v in scheduler_config.items() if k not in ("clip_sample", "set_alpha_to_one")}
    sched = DPMSolverSinglestepScheduler.from_config(
        cfg, algorithm_type="sde-dpmsolver++", solver_order=1, final_sigmas_type="sigma_min")
    sched.set_timesteps(num_steps)
    ac = sched.alphas_cumprod.to(torch.float64)
    t = sched.timesteps.long()
    sigmas = sched.sigmas.to(torch.float64)  # (T+1,) in the "variance exploding" parametrisation
    sig_s, sig_t = sigmas[:-1], sigmas[1:]
    alpha_s, alpha_t = 1 / (sig_s**2 + 1).sqrt(), 1 / (sig_t**2 + 1).sqrt()
    vp_s, vp_t = sig_s * alpha_s, sig_t * alpha_t
    h = (alpha_t.log() - vp_t.log()) - (alpha_s.log() - vp_s.log())
    coef_x = vp_t / vp_s * torch.exp(-h)
    coef_x0 = alpha_t * (1 - torch.exp(-2 * h))
    # x0 = (x - vp_s eps) / alpha_s
    c_x = coef_x + coef_x0 / alpha_s
    c_eps = -coef_x0 * vp_s / alpha_s
    std = vp_t * (1 - torch.exp(-2 * h)).sqrt()
    next_t = torch.cat([t[1:], t.new_zeros(1)])
    return StepSchedule("dpm-solver", t, next_t, c_x, c_eps, std, ac[t], ac[next_t],
                        float(sched.init_noise_sigma), dict(sched.config),
                        check_scheduler_config(scheduler_config), ac, *_vp_x0(ac[t]), *_vp_x0(ac[next_t]))


def flow_sde_schedule(scheduler_config: dict, num_steps: int, noise_level: float) -> StepSchedule:
    """Flow-GRPO's SDE step on the step grid of ``FlowMatchEulerDiscreteScheduler`` (the model's own
    ``shift``), noise level ``a = noise_level`` (0: the pipeline's Euler ODE step).

    With ``t`` the sigma of ``x_t``, ``dt = t_next - t`` and ``σ_t = a √(t / (1 - t'))`` (``t' = t``,
    except ``t' = `` the second sigma where ``t = 1``, as Flow-GRPO: ``σ_t`` is infinite at ``t = 1``)::

        c_x = 1 + σ_t² dt / (2t),   c_v = dt (1 + σ_t² (1 - t) / (2t)),   std = σ_t √(-dt)
        x̂0 = x - t v,   ᾱ analogue = (1 - t)²
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if scheduler_config.get("use_dynamic_shifting"):
        raise ValueError("the flow-matching scheduler config sets use_dynamic_shifting=True (resolution-dependent "
                         "shift, FLUX-style): the step grid would depend on the image size; the flow-sde sampler "
                         "supports a static shift (SD 3.x). Set use_dynamic_shifting=False and shift")
    if noise_level < 0:
        raise ValueError(f"flow-sde noise level a = {noise_level} is negative; it scales the std "
                         f"σ_t = a √(t/(1-t)): use a >= 0 (Flow-GRPO: 0.7; 0 = the deterministic Euler step)")
    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sched.set_timesteps(num_steps)
    if bool(sched.config.get("invert_sigmas", False)):
        raise ValueError("the flow-matching scheduler config sets invert_sigmas=True (Mochi); the flow-sde sampler "
                         "needs sigmas that decrease from 1 to 0. Use invert_sigmas=False")
    sig = sched.sigmas.to(torch.float64)  # (T+1,), the last one 0
    t, t_next = sig[:-1], sig[1:]
    if num_steps < 2 and bool((t == 1).any()):
        raise ValueError("flow-sde with 1 step starts at t = 1 where σ_t = a √(t/(1-t)) is infinite; use >= 2 steps")
    dt = t_next - t
    t_clamped = torch.where(t == 1, sig[1], t)
    var_rate = noise_level**2 * t / (1 - t_clamped)  # σ_t²
    c_x = 1 + var_rate * dt / (2 * t)
    c_v = dt * (1 + var_rate * (1 - t) / (2 * t))
    std = var_rate.sqrt() * (-dt).sqrt()
    timesteps = sched.timesteps.to(torch.float32)
    next_timesteps = torch.cat([timesteps[1:], timesteps.new_zeros(1)])
    ones = torch.ones_like(t)
    return StepSchedule("flow-sde", timesteps, next_timesteps, c_x, c_v, std, (1 - t) ** 2, (1 - t_next) ** 2,
                        1.0, dict(sched.config), "flow_prediction", None, ones, -t, ones, -t_next,
                        sig, float(noise_level))


def make_schedule(name: str, num_steps: int, eta: float = 1.0,
                  scheduler_config: Optional[dict] = None) -> StepSchedule:
    """The one place a sampler name becomes a :class:`StepSchedule`.

    ``eta``: the sampler's stochasticity — DDIM's eta (1 = DDPM), flow-sde's noise level ``a``
    (Flow-GRPO: 0.7; 0 = the Euler ODE step of the pipeline); unused by dpm-solver.
    ``scheduler_config``: the loaded model's (``SDParts.scheduler_config``); None = SD 1.x's (SD 3.5's
    for flow-sde).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    flow_sampler = name in FLOW_SAMPLERS
    default = SD3_SCHEDULER_CONFIG if flow_sampler else SD_SCHEDULER_CONFIG
    flow_model = is_flow_matching(scheduler_config or default)
    scheduler_config = {k: v for k, v in (scheduler_config or default).items() if not k.startswith("_")}
    if flow_model != flow_sampler:
        raise ValueError(
            f"sampler {name!r} does not fit the model's scheduler: the model is "
            f"{'flow matching (SD 3.x, velocity prediction)' if flow_model else 'a DDPM-type (betas) model'}; "
            f"use {' or '.join(repr(n) for n in (FLOW_SAMPLERS if flow_model else VP_SAMPLERS))}")
    check_scheduler_config(scheduler_config)
    if name == "ddim":
        sched = ddim_schedule(scheduler_config, num_steps, eta)
    elif name == "dpm-solver":
        sched = sde_dpmpp1_schedule(scheduler_config, num_steps)
    else:
        sched = flow_sde_schedule(scheduler_config, num_steps, eta)
    if not bool(torch.isfinite(sched.x0_eps_cur).all()):  # zero terminal SNR: x̂0 from ε would divide by zero
        raise ValueError(f"the schedule reaches ᾱ = 0 at timestep {int(sched.timesteps[0])} (zero terminal SNR "
                         f"with trailing spacing); use a leading spacing or steps_offset that skips it")
    return sched


def as_epsilon(model_fn: Callable[..., Tensor], sched: StepSchedule) -> Callable[..., Tensor]:
    """``ε(x, t, cond)`` from a (guided) model function that predicts ``sched.prediction_type`` (a
    v-prediction model's output converted; ε and flow velocity, the outputs the steps are written in,
    unchanged)."""
    if sched.prediction_type != "v_prediction":
        return model_fn

    def eps_fn(x: Tensor, t: Tensor, cond, *args, **kwargs) -> Tensor:
        return sched.to_epsilon(model_fn(x, t, cond, *args, **kwargs), x, t)

    return eps_fn


# ---------------------------------------------------------------- the math of one transition


def step_mean(sched: StepSchedule, step_index: Tensor, x: Tensor, eps: Tensor) -> Tensor:
    """Mean of ``P_F(x_{t-1} | x_t)``. Shapes: x, eps (N, C, H, W); step_index (N,)."""
    return sched.gather("c_x", step_index, x) * x + sched.gather("c_eps", step_index, x) * eps


def forward_score(sched: StepSchedule, step_index: Tensor, x_next: Tensor, mean: Tensor) -> Tensor:
    """``∇_{x_{t-1}} log P_F(x_{t-1} | x_t) = -(x_{t-1} - mean) / std²`` (keeps mean's graph)."""
    return -(x_next - mean) / sched.gather("std", step_index, x_next) ** 2


def reverse_score(sched: StepSchedule, step_index: Tensor, x: Tensor, eps: Tensor,
                  x_next: Tensor, retain_graph: bool = False, grad_scale: Optional[float] = None) -> Tensor:
    """``∇_{x_t} log P_F(x_{t-1} | x_t)`` by one vector-Jacobian product through ``eps(x_t)``.

    With ``u = (x_{t-1} - mean) / std²`` the gradient is ``c_x u + J_eps(x_t)^T (c_eps u)``.
    ``x`` must require grad and ``eps`` must have been computed from it. The result is detached
    (first order: no graph to the noise model's parameters).

    ``grad_scale`` (the fp16 loss scale, 1 included; None = plain, no scaling): the vector sent back
    through the noise model,
    ``c_eps u`` (its entries grow like 1/std), is first normalised per row to a largest entry of 1,
    then multiplied by ``grad_scale``, and the product is divided by the same factor in ``x``'s dtype
    (fp32): whether the fp16 backward overflows then depends on the scale and the noise model, not
    on the step's std (an overflow is recorded by the caller and lowers the scale).

    Shapes: x, eps, x_next (N, C, H, W); step_index (N,). Returns (N, C, H, W).
    """
    mean = step_mean(sched, step_index, x.detach(), eps.detach())
    u = (x_next - mean) / sched.gather("std", step_index, x) ** 2
    v = sched.gather("c_eps", step_index, x) * u
    mult = 1.0
    if grad_scale is not None:
        peak = v.detach().abs().flatten(1).amax(1).clamp(min=torch.finfo(v.dtype).tiny)
        mult = grad_scale / peak.view(-1, *([1] * (v.dim() - 1)))
    (vjp,) = torch.autograd.grad(eps, x, grad_outputs=v * mult, retain_graph=retain_graph)
    return (sched.gather("c_x", step_index, x) * u + vjp / mult).detach()


def pred_x0(x: Tensor, eps: Tensor, alpha: Tensor) -> Tensor:
    """Predicted clean latent ``(x - sqrt(1-a) eps) / sqrt(a)``; ``alpha`` broadcastable (N,1,1,1)."""
    return (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def reward_weight(alpha: Tensor, mode: str) -> Tensor:
    """``w(ᾱ)`` of the reward score: ``ᾱ`` ("squared", default) or ``√ᾱ`` ("sqrt")."""
    if mode == "squared":
        return alpha
    if mode == "sqrt":
        return alpha.sqrt()
    raise ValueError(f"unknown reward_adaptive_mode {mode!r}; choose 'squared' or 'sqrt'")
