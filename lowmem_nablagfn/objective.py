"""Residual ∇-DB and no-flow losses as pure functions of tensors (docs/algorithm.md, "Loss").

For one batch of ``N`` transitions ``x_t -> x_{t-1}`` (rows), with ``end`` marking the last one::

    s_R(x_s)  = β w(ᾱ_s) ∇R(x_s)                                  (detached reward score)
    y_F       = s_F^ref(x_{t-1}) + [not end] g(x_{t-1}) + s_R(x_{t-1})
    y_B       = [not end] (∇_{x_t} log P_F^ref - g(x_t) - s_R(x_t))
    forward   = mean_rows mean_chw |s_F^θ(x_{t-1}) - y_F|²
    reverse   = mean_rows mean_chw |∇_{x_t} log P_F^θ - y_B|²         (0 in no-flow mode)
    terminal  = Σ_end mean_chw g(x_{t-1})² / (n_end + 1e-6)             (0 in no-flow mode)
    reg       = mean_rows mean_chw (ε^θ(x_t) - ε_sampled)²
    loss      = forward + λ_rev reverse + terminal + λ_reg reg

``row_norm`` / ``end_norm`` replace the batch's own ``N`` / ``n_end`` so that a batch split into
chunks gives, summed over chunks, exactly the loss of the whole batch (memory plan).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from .diffusion import reward_weight


@dataclass
class Scores:
    """Scores of one policy on N rows: ``forward`` = ``s_F(x_{t-1})`` (N, C, H, W); ``reverse`` =
    ``∇_{x_t} log P_F`` (N, C, H, W), detached, or None (no-flow mode)."""

    forward: Tensor
    reverse: Optional[Tensor] = None


@dataclass
class RewardGrads:
    """Raw ``∇R`` w.r.t. the latent (detached) at ``x_{t-1}`` and at ``x_t`` (None: not needed)."""

    next: Tensor
    cur: Optional[Tensor] = None


@dataclass
class FlowValues:
    """``g_φ(x_t, t)`` and ``g_φ(x_{t-1}, t-Δ)`` (N, C, H, W), with graphs."""

    cur: Tensor
    next: Tensor


@dataclass
class Steps:
    """Per-row schedule values: ``ᾱ`` at the next / current timestep (N,), and ``end`` (N,) bool, the
    last transition of a trajectory."""

    alpha_next: Tensor
    alpha_cur: Tensor
    end: Tensor


@dataclass
class TrustRegion:
    """The policy's ε at ``x_t`` (with graph) and the ε stored while sampling (N, C, H, W)."""

    eps: Tensor
    eps_sampled: Tensor


@dataclass(frozen=True)
class LossWeights:
    """β (``reward_scale``), λ_rev, λ_reg and the reward weight's form (``"squared"``: w = ᾱ,
    ``"sqrt"``: w = √ᾱ)."""

    reward_scale: float
    reverse_loss_scale: float
    unet_reg_scale: float
    reward_adaptive_mode: str = "squared"


@dataclass
class LossTerms:
    """The loss and its parts (scalars); targets are kept for tests and diagnostics."""

    loss: Tensor
    forward: Tensor
    reverse: Tensor
    terminal: Tensor
    reg: Tensor
    target_forward: Tensor
    target_reverse: Tensor

    def tensors(self) -> dict:
        """The 0-dim terms, detached."""
        return {f.name: getattr(self, f.name).detach() for f in fields(self) if getattr(self, f.name).dim() == 0}

    def scalars(self) -> dict:
        return {k: float(v) for k, v in self.tensors().items()}


def _per_row(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def _col(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def nabla_db_loss(*, policy: Scores, reference: Scores, reward: RewardGrads, flow: Optional[FlowValues],
                  steps: Steps, trust: TrustRegion, weights: LossWeights, row_norm: Optional[float] = None,
                  end_norm: Optional[float] = None) -> LossTerms:
    """Residual ∇-DB loss, or the no-flow loss when ``flow is None``.

    Args:
        policy: ``s_F^θ(x_{t-1})`` with its graph to the policy; ``∇_{x_t} log P_F^θ`` detached
            (unused in no-flow mode).
        reference: the reference scores × pretrained_strength, detached.
        reward: raw reward gradients; ``reward.cur`` is needed with a flow.
        flow: the flow model's outputs with graphs, or None (no-flow mode).
        steps: ``ᾱ`` per row and the last-transition mask.
        trust: ε of the policy and of the sampler, for the trust-region term.
        weights: β, λ_rev, λ_reg (λ_rev is ignored without a flow) and the reward weight's form.
        row_norm: divisor of the row sums (default N).
        end_norm: divisor of the terminal sum (default n_end + 1e-6).
    """
    no_flow = flow is None
    score_next, end = policy.forward, steps.end
    n = score_next.shape[0]
    row_norm = float(n) if row_norm is None else row_norm
    end_norm = float(end.sum()) + 1e-6 if end_norm is None else end_norm
    not_end = _col(~end, score_next)

    def reward_score(grad: Tensor, alpha: Tensor) -> Tensor:
        w = reward_weight(alpha.to(grad.dtype), weights.reward_adaptive_mode).view(-1, *([1] * (grad.dim() - 1)))
        return weights.reward_scale * w * grad

    target_forward = reference.forward + reward_score(reward.next, steps.alpha_next)
    if not no_flow:
        target_forward = target_forward + not_end * flow.next
    forward = _per_row((score_next - target_forward) ** 2).sum() / row_norm

    zero = score_next.new_zeros(())
    if no_flow:
        if reference.reverse is not None and reward.cur is not None:
            target_reverse = not_end * (reference.reverse - reward_score(reward.cur, steps.alpha_cur))
        else:
            target_reverse = torch.zeros_like(score_next)
        reverse, terminal = zero, zero
    else:
        target_reverse = not_end * (reference.reverse - flow.cur - reward_score(reward.cur, steps.alpha_cur))
        reverse = _per_row((policy.reverse - target_reverse) ** 2).sum() / row_norm
        terminal = (_per_row(flow.next**2) * end.to(flow.next.dtype)).sum() / end_norm

    reg = _per_row((trust.eps - trust.eps_sampled) ** 2).sum() / row_norm
    reverse_scale = 0.0 if no_flow else weights.reverse_loss_scale
    loss = forward + reverse_scale * reverse + terminal + weights.unet_reg_scale * reg
    return LossTerms(loss, forward, reverse, terminal, reg, target_forward, target_reverse)
