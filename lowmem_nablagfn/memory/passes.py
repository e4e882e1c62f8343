"""The passes an update is made of, on plain callables: policy ε, reference ε, flow ``g_φ`` and the
latent reward.  Each pass computes one phase's quantity for a set of rows (see
:mod:`~lowmem_nablagfn.memory.plan`); the executor decides the order, the chunks and the graphs.
Any model pair fits: the SD / SDXL UNet with its LoRA (:func:`~lowmem_nablagfn.loop.update_context`)
and the analytic validation's MLPs (:mod:`~lowmem_nablagfn.analytic`) run the same passes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Sequence

import torch
from torch import Tensor

from ..diffusion import StepSchedule, forward_score, reverse_score, step_mean
from ..objective import FlowValues, LossTerms, LossWeights, RewardGrads, Scores, Steps, TrustRegion, nabla_db_loss
from ..sampling import as_conditioning
from .plan import MemoryPlan, build_plan
from .rows import Rows
from .scaler import LossScaler

EpsFn = Callable[[Tensor, Tensor, object], Tensor]
LatentReward = Callable[[Tensor, Sequence[str]], Tensor]


@dataclass
class UpdateFns:
    """What an update calls, as plain callables.

    Attributes:
        eps: ``eps(x, t, cond)``, ε of the policy as it is now (with a graph when grad is enabled).
        ref_eps: ``ref_eps(x, t, cond)``, ε of the reference (pretrained) policy.
        flow: ``flow(x, t, embeds)``, ``g_φ`` on the (N, L, D) prompt states; None: no-flow mode.
        latent_reward: ``latent_reward(x0, prompts)`` -> (N,) reward of clean latents.
        ref_scope: ``ref_scope()``, a context around the reference pass's forward *and* backward
            (the LoRA switched off: a checkpointed UNet recomputes its forward inside the backward).
    """

    eps: EpsFn
    ref_eps: EpsFn
    flow: Optional[EpsFn]
    latent_reward: LatentReward
    ref_scope: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass
class ObjectiveSettings:
    """The scalars of the objective (from ``ModelConfig``)."""

    reward_scale: float
    reverse_loss_scale: float
    unet_reg_scale: float
    pretrained_strength: float = 1.0
    reward_adaptive_mode: str = "squared"
    flow_zero_prompt: bool = False

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.reward_scale, self.reverse_loss_scale, self.unet_reg_scale,
                           self.reward_adaptive_mode)


@dataclass
class UpdateContext:
    """Everything one gradient computation needs; ``fns.flow is None`` means no-flow mode.

    ``plan`` None: the optimized plan without chunks.  ``scaler``: the fp16 loss scale of every
    backward pass (disabled: a pass-through)."""

    fns: UpdateFns
    sched: StepSchedule
    settings: ObjectiveSettings
    plan: Optional[MemoryPlan] = None
    scaler: LossScaler = field(default_factory=LossScaler)

    def __post_init__(self):
        if self.plan is None:
            self.plan = build_plan(None, self.residual)
        elif self.plan.residual != self.residual:
            raise ValueError(f"the memory plan is for the {'residual' if self.plan.residual else 'no-flow'} objective "
                             f"but the update has {'a' if self.residual else 'no'} flow model; build the plan with "
                             f"residual={self.residual}")

    @property
    def residual(self) -> bool:
        return self.fns.flow is not None


@dataclass
class Detached:
    """The detached inputs of the graph that trains, per row (N, C, H, W): reference scores and raw
    reward gradients (``s_cur_ref`` / ``r_cur`` None in no-flow mode)."""

    s_next_ref: Tensor
    s_cur_ref: Optional[Tensor]
    r_next: Tensor
    r_cur: Optional[Tensor]

    def take(self, idx) -> "Detached":
        pick = lambda v: None if v is None else v[idx]  # noqa: E731
        return Detached(pick(self.s_next_ref), pick(self.s_cur_ref), pick(self.r_next), pick(self.r_cur))


# ----------------------------------------------------------------------------- small helpers

def timesteps(ctx: UpdateContext, rows: Rows, nxt: bool) -> Tensor:
    table = ctx.sched.next_timesteps if nxt else ctx.sched.timesteps
    return table.to(rows.x.device)[rows.step_index]


def alpha(ctx: UpdateContext, rows: Rows, nxt: bool) -> Tensor:
    return ctx.sched.gather("alpha_next" if nxt else "alpha_cur", rows.step_index, rows.x)


def column(mask: Tensor, like: Tensor) -> Tensor:
    """A (N,) mask shaped to broadcast against ``like``."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def flow_at(ctx: UpdateContext, x: Tensor, t: Tensor, rows: Rows) -> Tensor:
    embeds = as_conditioning(rows.cond).prompt_embeds  # g_φ attends to the prompt states only
    embeds = torch.zeros_like(embeds) if ctx.settings.flow_zero_prompt else embeds
    return ctx.fns.flow(x, t, embeds.to(x.dtype))


# ----------------------------------------------------------------------------- the passes

def reward_grad_at(ctx: UpdateContext, rows: Rows, nxt: bool) -> Tensor:
    """Raw ``∇_{x_s} R(decode(x̂0(x_s)))`` at ``x_{t-1}`` (``nxt``) or ``x_t``, no parameter graph kept.

    ``x̂0`` is predicted by the current policy; at the last transition's next state (timestep 0)
    ``x̂0 = x_{t-1}`` and the policy is not called.  Returns (N, C, H, W), detached.
    """
    x = (rows.x_next if nxt else rows.x).detach().requires_grad_(True)

    def total_reward() -> Tensor:  # called again if an fp16 retry needs the graph its backward freed
        if nxt:
            x0 = x.clone()
            live = rows.live()
            if live.numel():
                sub = rows.take(live)
                eps = ctx.fns.eps(x[live], timesteps(ctx, sub, True), sub.cond)
                x0 = x0.index_put((live,), ctx.sched.pred_x0(sub.step_index, x[live], eps, nxt=True))
        else:
            x0 = ctx.sched.pred_x0(rows.step_index, x, ctx.fns.eps(x, timesteps(ctx, rows, False), rows.cond))
        return ctx.fns.latent_reward(x0, rows.prompts).sum()

    return ctx.scaler.input_grad(total_reward, x)


def reference_scores(ctx: UpdateContext, rows: Rows, need_reverse: bool) -> tuple:
    """``s_F^ref(x_{t-1})`` and ``∇_{x_t} log P_F^ref`` (× pretrained_strength; None unless
    ``need_reverse``), detached."""
    strength = ctx.settings.pretrained_strength
    x = rows.x.detach().requires_grad_(need_reverse)
    t = timesteps(ctx, rows, False)
    with ctx.fns.ref_scope(), torch.set_grad_enabled(need_reverse):
        eps_ref = ctx.fns.ref_eps(x, t, rows.cond)
        mean = step_mean(ctx.sched, rows.step_index, x.detach(), eps_ref.detach())
        s_next = strength * forward_score(ctx.sched, rows.step_index, rows.x_next, mean)
        s_cur = None
        if need_reverse:
            def vjp(scale: Optional[float], rebuild: bool) -> Tensor:  # an fp16 retry rebuilds the graph it freed
                eps = ctx.fns.ref_eps(x, t, rows.cond) if rebuild else eps_ref
                return reverse_score(ctx.sched, rows.step_index, x, eps, rows.x_next, grad_scale=scale)

            s_cur = strength * ctx.scaler.retry("reverse", vjp)
    return s_next.detach(), s_cur


def loss_of(ctx: UpdateContext, rows: Rows, eps: Tensor, x: Tensor, det: Detached,
            row_norm: float, end_norm: float) -> LossTerms:
    """Policy scores and flow outputs with graphs (``eps`` = ε of the policy at ``x``), then the loss."""
    sched = ctx.sched
    mean = step_mean(sched, rows.step_index, x.detach(), eps)
    s_next = forward_score(sched, rows.step_index, rows.x_next, mean)
    flow = s_cur = None
    if ctx.residual:
        s_cur = ctx.scaler.retry("reverse", lambda scale, _: reverse_score(sched, rows.step_index, x, eps, rows.x_next,
                                                                          retain_graph=True, grad_scale=scale))
        flow_next = flow_at(ctx, rows.x_next, timesteps(ctx, rows, True), rows)
        flow = FlowValues(cur=flow_at(ctx, rows.x.detach(), timesteps(ctx, rows, False), rows), next=flow_next)
    return nabla_db_loss(
        policy=Scores(s_next, s_cur), reference=Scores(det.s_next_ref, det.s_cur_ref if ctx.residual else None),
        reward=RewardGrads(det.r_next, det.r_cur), flow=flow,
        steps=Steps(alpha(ctx, rows, True).flatten(), alpha(ctx, rows, False).flatten(), rows.end),
        trust=TrustRegion(eps, rows.eps_sampled), weights=ctx.settings.weights,
        row_norm=row_norm, end_norm=end_norm)


def train_pass(ctx: UpdateContext, rows: Rows, det: Detached, *, row_norm: float, end_norm: float,
               scale: float = 1.0) -> LossTerms:
    """The one graph that trains: policy (and flow) outputs of these rows, loss, backward.

    ``det``: this chunk's rows of the detached inputs.  Adds ``scale * ∂L_rows/∂θ, ∂L_rows/∂φ`` to
    ``.grad``; returns the loss terms."""
    x = rows.x.detach().requires_grad_(ctx.residual)
    eps = ctx.fns.eps(x, timesteps(ctx, rows, False), rows.cond)
    terms = loss_of(ctx, rows, eps, x, det, row_norm, end_norm)
    ctx.scaler.backward(terms.loss * scale)
    return terms
