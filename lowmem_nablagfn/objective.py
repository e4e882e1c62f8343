"""Residual ∇-DB and no-flow losses as pure functions of tensors (ALGORITHM.md, "Loss").

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
class LossTerms:
    """The loss and its parts (scalars); targets are kept for tests and diagnostics."""

    loss: Tensor
    forward: Tensor
    reverse: Tensor
    terminal: Tensor
    reg: Tensor
    target_forward: Tensor
    target_reverse: Tensor

    def scalars(self) -> dict:
        return {f.name: float(getattr(self, f.name).detach())
                for f in fields(self) if getattr(self, f.name).dim() == 0}


def _per_row(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def _col(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def nabla_db_loss(
    score_next: Tensor,
    score_next_ref: Tensor,
    score_cur: Optional[Tensor],
    score_cur_ref: Optional[Tensor],
    flow_cur: Optional[Tensor],
    flow_next: Optional[Tensor],
    reward_grad_next: Tensor,
    reward_grad_cur: Optional[Tensor],
    alpha_next: Tensor,
    alpha_cur: Tensor,
    end_mask: Tensor,
    eps: Tensor,
    eps_sampled: Tensor,
    reward_scale: float,
    reverse_loss_scale: float,
    unet_reg_scale: float,
    reward_adaptive_mode: str = "squared",
    row_norm: Optional[float] = None,
    end_norm: Optional[float] = None,
) -> LossTerms:
    """Residual ∇-DB loss, or the no-flow loss when ``flow_next is None``.

    Args:
        score_next: (N, C, H, W) ``s_F^θ(x_{t-1})``, with its graph to the policy.
        score_next_ref: (N, C, H, W) ``s_F^ref(x_{t-1})`` × pretrained_strength, detached.
        score_cur: (N, C, H, W) ``∇_{x_t} log P_F^θ``, detached (unused in no-flow mode).
        score_cur_ref: (N, C, H, W) ``∇_{x_t} log P_F^ref`` × pretrained_strength.
        flow_cur, flow_next: (N, C, H, W) ``g_φ(x_t, t)`` and ``g_φ(x_{t-1}, t-Δ)`` with graphs;
            ``None`` selects no-flow mode.
        reward_grad_next, reward_grad_cur: (N, C, H, W) raw ``∇R`` w.r.t. the latent.
        alpha_next, alpha_cur: (N,) ``ᾱ`` at the next / current timestep.
        end_mask: (N,) bool, the last transition of a trajectory.
        eps, eps_sampled: (N, C, H, W) policy output (with graph) and the stored sampling output.
        reward_scale, reverse_loss_scale, unet_reg_scale: β, λ_rev, λ_reg.
        reward_adaptive_mode: ``"squared"`` (w = ᾱ) or ``"sqrt"`` (w = √ᾱ).
        row_norm: divisor of the row sums (default N).
        end_norm: divisor of the terminal sum (default n_end + 1e-6).
    """
    no_flow = flow_next is None
    n = score_next.shape[0]
    row_norm = float(n) if row_norm is None else row_norm
    end_norm = float(end_mask.sum()) + 1e-6 if end_norm is None else end_norm
    not_end = _col(~end_mask, score_next)

    def reward_score(grad: Tensor, alpha: Tensor) -> Tensor:
        w = reward_weight(alpha.to(grad.dtype), reward_adaptive_mode).view(-1, *([1] * (grad.dim() - 1)))
        return reward_scale * w * grad

    target_forward = score_next_ref + reward_score(reward_grad_next, alpha_next)
    if not no_flow:
        target_forward = target_forward + not_end * flow_next
    forward = _per_row((score_next - target_forward) ** 2).sum() / row_norm

    zero = score_next.new_zeros(())
    if no_flow:
        if score_cur_ref is not None and reward_grad_cur is not None:
            target_reverse = not_end * (score_cur_ref - reward_score(reward_grad_cur, alpha_cur))
        else:
            target_reverse = torch.zeros_like(score_next)
        reverse, terminal = zero, zero
    else:
        target_reverse = not_end * (score_cur_ref - flow_cur - reward_score(reward_grad_cur, alpha_cur))
        reverse = _per_row((score_cur - target_reverse) ** 2).sum() / row_norm
        terminal = (_per_row(flow_next**2) * end_mask.to(flow_next.dtype)).sum() / end_norm

    reg = _per_row((eps - eps_sampled) ** 2).sum() / row_norm
    loss = forward + reverse_loss_scale * reverse + terminal + unet_reg_scale * reg
    return LossTerms(loss, forward, reverse, terminal, reg, target_forward, target_reverse)
