"""The one executor: runs a :class:`~lowmem_nablagfn.memory.plan.MemoryPlan` over a batch of rows and
accumulates the gradients of the batch loss into the parameters' ``.grad``.

Each phase of the plan writes its quantity into the group's state (reference scores, the policy's
graph at ``x_t``, reward gradients); the ``train`` phase builds the loss from it and runs the
backward.  A phase with ``keep_graph`` runs the official code's pass (the whole group, the LoRA graph
at ``x_t`` alive from ``policy`` to ``train``); otherwise it runs in chunks of ``phase.chunk`` rows,
each chunk in its own scope.  Every phase is a ``memtrack`` mark (profiler, planner traces).  Every
backward goes through ``ctx.scaler`` (:mod:`.scaler`): under fp16 a pass that overflows is run again at
once at a lower loss scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from .. import memtrack
from ..objective import LossTerms
from .passes import Detached, UpdateContext, column, loss_of, reference_scores, reward_grad_at, timesteps, train_pass
from .plan import Phase
from .rows import Rows


@dataclass
class _Group:
    """What the phases of one group of rows (a batch, or one transition slot of it) have computed."""

    rows: Rows
    row_norm: float
    end_norm: float
    scale: float
    s_next_ref: Optional[Tensor] = None
    s_cur_ref: Optional[Tensor] = None
    r_next: Optional[Tensor] = None
    r_cur: Optional[Tensor] = None
    x: Optional[Tensor] = None  # x_t with requires_grad, and the policy's ε on it (keep_graph plans)
    eps: Optional[Tensor] = None
    terms: List[LossTerms] = field(default_factory=list)

    def detached(self) -> Detached:
        return Detached(self.s_next_ref, self.s_cur_ref, self.r_next, self.r_cur)


def _chunked(fn: Callable[[Rows], object], rows: Rows, ph: Phase):
    outs = [fn(c) for c in rows.chunk(ph.call_rows(len(rows)))]
    if isinstance(outs[0], tuple):
        return tuple(None if o[0] is None else torch.cat(o) for o in zip(*outs))
    return torch.cat(outs)


def _reference(ctx: UpdateContext, g: _Group, ph: Phase) -> None:
    need_reverse = ctx.plan.reference_needs_reverse(ph)
    g.s_next_ref, g.s_cur_ref = _chunked(lambda c: reference_scores(ctx, c, need_reverse), g.rows, ph)


def _policy(ctx: UpdateContext, g: _Group, ph: Phase) -> None:
    g.x = g.rows.x.detach().requires_grad_(True)
    g.eps = ctx.fns.eps(g.x, timesteps(ctx, g.rows, False), g.rows.cond)


def _reward_grad_next(ctx: UpdateContext, g: _Group, ph: Phase) -> None:
    rows = g.rows
    if not ph.keep_graph:
        g.r_next = _chunked(lambda c: reward_grad_at(ctx, c, nxt=True), rows, ph)
        return
    # the official pass: the LoRA UNet on every row (last transitions too), x̂0 = x_{t-1} at t = 0
    xn = rows.x_next.detach().requires_grad_(True)

    def total_reward() -> Tensor:  # called again if an fp16 retry needs the graph its backward freed
        eps_n = ctx.fns.eps(xn, timesteps(ctx, rows, True), rows.cond)
        x0n = torch.where(column(rows.end, xn), xn, ctx.sched.pred_x0(rows.step_index, xn, eps_n, nxt=True))
        return ctx.fns.latent_reward(x0n, rows.prompts).sum()

    g.r_next = ctx.scaler.input_grad(total_reward, xn)


def _reward_grad_cur(ctx: UpdateContext, g: _Group, ph: Phase) -> None:
    rows = g.rows
    if ph.keep_graph:  # a second VAE + reward graph hanging off the policy's graph at x_t
        x0 = ctx.sched.pred_x0(rows.step_index, g.x, g.eps)
        g.r_cur = ctx.scaler.input_grad(lambda: ctx.fns.latent_reward(x0, rows.prompts).sum(), g.x, retain_graph=True)
        return
    sel = rows.live() if ph.live_only else torch.arange(len(rows), device=rows.x.device)
    g.r_cur = torch.zeros_like(rows.x)  # y_B = 0 on last transitions: their reward score at x_t is not needed
    if sel.numel():
        g.r_cur[sel] = _chunked(lambda c: reward_grad_at(ctx, c, nxt=False), rows.take(sel), ph)


def _train(ctx: UpdateContext, g: _Group, ph: Phase) -> None:
    # every backward of parameter gradients through ctx.scaler.accumulate: under fp16 an overflowing
    # pass is run again at once at a lower loss scale (run(rebuild=True)), not the update skipped
    det = g.detached()
    if ph.keep_graph:
        def run(rebuild: bool) -> LossTerms:  # a retry rebuilds the policy's graph the failed backward freed
            eps = ctx.fns.eps(g.x, timesteps(ctx, g.rows, False), g.rows.cond) if rebuild else g.eps
            terms = loss_of(ctx, g.rows, eps, g.x, det, g.row_norm, g.end_norm)
            ctx.scaler.backward(terms.loss * g.scale)
            return terms

        g.terms.append(ctx.scaler.accumulate(run))
        return
    n = len(g.rows)
    size = ph.call_rows(n)
    for lo in range(0, n, size):
        idx = slice(lo, lo + size)
        g.terms.append(ctx.scaler.accumulate(lambda _: train_pass(ctx, g.rows.take(idx), det.take(idx),
                                                                  row_norm=g.row_norm, end_norm=g.end_norm,
                                                                  scale=g.scale)))


PASSES = {"reference": _reference, "policy": _policy, "reward_grad_next": _reward_grad_next,
          "reward_grad_cur": _reward_grad_cur, "train": _train}


def accumulate_gradients(ctx: UpdateContext, rows: Rows, *, row_norm: float, end_norm: float,
                         scale: float = 1.0) -> Dict[str, Tensor]:
    """Add ``scale * ∂L/∂θ, ∂L/∂φ`` of these rows to the parameters' ``.grad``, running the plan.

    ``row_norm`` / ``end_norm`` are the divisors of the whole batch (:meth:`Rows.norms`) so that
    chunks and slots sum to the batch loss.  Returns the loss terms of these rows, summed, as detached
    0-dim tensors (no device sync here; the planner runs this on fake tensors, which have no value)."""
    groups = rows.slots() if ctx.plan.per_slot else [rows]
    totals: Dict[str, Tensor] = {}
    for rows_g in groups:
        g = _Group(rows_g, row_norm, end_norm, scale)
        for ph in ctx.plan.phases:
            with memtrack.phase(ph.name):
                PASSES[ph.name](ctx, g, ph)
        for t in g.terms:
            for k, v in t.tensors().items():
                totals[k] = totals[k] + v if k in totals else v
    return totals
