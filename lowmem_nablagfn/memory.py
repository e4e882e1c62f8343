"""The memory plan in one place: which passes run in which order, what keeps a graph, chunk sizes,
gradient checkpointing — and the gradient computation of one training batch under that plan.

Three schedules compute the same gradients (tests prove it):

``official`` — the official code's order *and granularity* (``train_nablagfn.py``: a loop over the
transition slots ``j`` of the batch, ``B`` rows each, ``loss.backward()`` inside the loop): per slot,
the reference UNet at ``x_t`` with a graph (reverse score), the LoRA UNet at ``x_t`` keeping its graph
to the end, the LoRA UNet at ``x_{t-1}`` + VAE decode + reward with graphs for the reward gradient,
and (residual mode) a second VAE + reward graph hanging off the ``x_t`` graph; then that slot's
backward.  The baseline of every "vs" figure (benchmarks, planner).  Only the order and the graphs
follow the official code: the loss normalisation is ours (one divisor for the batch, ALGORITHM.md).

``naive`` — the same passes with all ``B·(K+1)`` rows of the batch in one graph and one backward:
the plainest computation of the batch loss, kept as the gradient reference of the tests (no
accumulation across backwards can hide an error in it); nobody should train with it.

``optimized`` — every detached quantity is computed first, each in its own scope and in chunks of
``input_grad_chunk`` rows (rows are independent, so this is exact): reward scores at ``x_{t-1}``
(UNet skipped for last transitions, where ``x̂0 = x_{t-1}``) and at ``x_t`` (recomputing the LoRA
output instead of retaining it), then the reference scores.  Only then the graph that trains is
built, in chunks of ``train_chunk`` rows whose gradients accumulate, so at most one UNet graph is
alive at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from . import memtrack
from .diffusion import StepSchedule, forward_score, pred_x0, reverse_score, step_mean
from .models import reference_policy, set_attention_backend
from .objective import nabla_db_loss
from .sampling import Cond, as_conditioning

LatentReward = Callable[[Tensor, Sequence[str]], Tensor]


@dataclass
class Rows:
    """A flat batch of ``N`` transitions (float32 on the compute device).

    x, x_next, eps_sampled: (N, C, H, W); step_index: (N,) long; cond: (N, L, D) or a
    :class:`~lowmem_nablagfn.sampling.Conditioning` of N rows (SDXL); end: (N,) bool;
    slot: (N,) long, the transition slot ``0 … K`` of each row within its trajectory (the official
    schedule trains slot by slot), or None: all rows one slot.
    """

    x: Tensor
    x_next: Tensor
    eps_sampled: Tensor
    step_index: Tensor
    cond: Cond
    prompts: List[str]
    end: Tensor
    slot: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def chunk(self, size: int) -> List["Rows"]:
        n = len(self)
        size = n if size <= 0 else size
        return [self.take(slice(i, min(i + size, n))) for i in range(0, n, size)]

    def take(self, idx) -> "Rows":
        prompts = self.prompts[idx] if isinstance(idx, slice) else [self.prompts[i] for i in idx.tolist()]
        return Rows(self.x[idx], self.x_next[idx], self.eps_sampled[idx], self.step_index[idx],
                    self.cond[idx], prompts, self.end[idx], None if self.slot is None else self.slot[idx])

    def slots(self) -> List["Rows"]:
        """The rows of each transition slot, in slot order (one group when ``slot`` is None)."""
        if self.slot is None:
            return [self]
        return [self.take((self.slot == s).nonzero().squeeze(1)) for s in self.slot.unique(sorted=True).tolist()]


class LossScaler:
    """Dynamic loss scaling of every backward pass, for fp16 frozen parts (V100 and other cards
    without bf16); disabled (scale 1, a pass-through) for bf16 and fp32, which need none.

    Every backward — the training loss and the input-gradient passes (reward score through the VAE
    and UNet, reverse scores) — runs on ``scale ×`` its output, so that small gradients survive the
    fp16 parts; results are unscaled in fp32 (input gradients at once, :meth:`input_grad`; parameter
    gradients before clipping, :meth:`unscale_grads_`, called by ``distributed.DataParallel``).  An
    update whose scaled gradients overflowed is skipped by the trainer's non-finite guard (optimiser
    untouched) and :meth:`back_off` halves the scale; ``growth_interval`` good updates in a row double
    it (torch.amp.GradScaler's rule).

    Args:
        enabled: scale at all (``training.mixed_precision == "fp16"``).
        init_scale, growth_factor, backoff_factor, growth_interval: torch.amp.GradScaler's defaults.
        min_scale: below this an overflow is not the scale's fault (a true inf/NaN): :meth:`back_off`
            returns False and the guard counts the skip as a failure.
    """

    def __init__(self, enabled: bool = False, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        self.enabled = enabled
        self._scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_updates = 0
        self.found_inf = False  # an input-gradient pass of this update overflowed

    @property
    def scale(self) -> float:
        return self._scale if self.enabled else 1.0

    def backward(self, loss: Tensor) -> None:
        """``(scale · loss).backward()``: parameter gradients accumulate scaled."""
        (loss * self._scale if self.enabled else loss).backward()

    def check(self, value: Tensor) -> Tensor:
        """Record an overflow of an (already unscaled) input gradient; returns ``value``."""
        if self.enabled and not bool(torch.isfinite(value).all()):
            self.found_inf = True
        return value

    def input_grad(self, output: Tensor, inputs: Tensor, retain_graph: bool = False) -> Tensor:
        """``∂ output / ∂ inputs`` (``output`` a scalar) through a scaled backward, unscaled in fp32."""
        if not self.enabled:
            return torch.autograd.grad(output, inputs, retain_graph=retain_graph)[0].detach()
        (grad,) = torch.autograd.grad(output * self._scale, inputs, retain_graph=retain_graph)
        return self.check(grad.float() / self._scale).detach()

    @torch.no_grad()
    def unscale_grads_(self, params: Iterable[nn.Parameter]) -> None:
        """Divide the accumulated (fp32) parameter gradients by the scale, in place."""
        if self.enabled:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self._scale)

    def stepped(self) -> Dict[str, float]:
        """After an optimiser step: count it, grow the scale every ``growth_interval`` in a row."""
        self.found_inf = False
        if not self.enabled:
            return {}
        self.good_updates += 1
        if self.good_updates >= self.growth_interval:
            self._scale *= self.growth_factor
            self.good_updates = 0
        return {"loss_scale": self._scale}

    def back_off(self) -> bool:
        """After a skipped update: lower the scale. False when disabled or already at ``min_scale``
        (then the overflow is a true inf/NaN, not the scale's)."""
        self.found_inf = False
        self.good_updates = 0
        if not self.enabled or self._scale <= self.min_scale:
            return False
        self._scale = max(self._scale * self.backoff_factor, self.min_scale)
        return True

    def state_dict(self) -> dict:
        return {"scale": self._scale, "good_updates": self.good_updates}

    def load_state_dict(self, state: dict) -> None:
        self._scale, self.good_updates = float(state["scale"]), int(state["good_updates"])


@dataclass
class ObjectiveSettings:
    """The scalars of the objective (from ``ModelConfig``)."""

    reward_scale: float
    reverse_loss_scale: float
    unet_reg_scale: float
    pretrained_strength: float = 1.0
    reward_adaptive_mode: str = "squared"
    flow_zero_prompt: bool = False


@dataclass
class UpdateContext:
    """Everything one gradient computation needs. ``flow_model is None`` means no-flow mode.

    Attributes:
        eps_fn: guided noise prediction of the UNet *as it is now* (LoRA on unless inside
            :func:`~lowmem_nablagfn.models.reference_policy`), ``eps_fn(x, t, cond)``.
        unet: the UNet carrying the adapter (to switch to the reference policy).
        flow_model: ``g_φ`` or ``None``.
        latent_reward: ``R(decode(x0))`` for (N, C, H, W) clean latents and N prompts -> (N,).
        sched: the sampler's schedule.
        scaler: the fp16 loss scale of every backward pass (disabled: a pass-through).
    """

    eps_fn: Callable[[Tensor, Tensor, Tensor], Tensor]
    unet: nn.Module
    flow_model: Optional[nn.Module]
    latent_reward: LatentReward
    sched: StepSchedule
    settings: ObjectiveSettings
    mode: str = "optimized"
    """``optimized``, ``official`` or ``naive`` (``MemoryConfig.mode``)."""
    input_grad_chunk: int = 0
    train_chunk: int = 0
    scaler: LossScaler = field(default_factory=LossScaler)


def apply_checkpointing(unet: nn.Module, vae: Optional[nn.Module], reward: Optional[nn.Module],
                        flow_model: Optional[nn.Module], mem) -> None:
    """Switch gradient checkpointing on the parts the plan names (``MemoryConfig``), and give the
    UNet, VAE and flow model the attention processor of ``memory.attention``."""
    set_attention_backend((unet, vae, flow_model), getattr(mem, "attention", "sdpa"))
    for module, on in ((unet, mem.checkpoint_unet), (vae, mem.checkpoint_vae),
                       (flow_model, mem.checkpoint_flow)):
        if module is not None and on and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
    if reward is not None and hasattr(reward, "set_checkpointing"):  # TowerReward (rewards/towers.py)
        reward.set_checkpointing(mem.checkpoint_reward)
    elif reward is not None and mem.checkpoint_reward and hasattr(reward, "set_grad_checkpointing"):
        reward.set_grad_checkpointing(True)


# ----------------------------------------------------------------------------- building blocks

def _timesteps(ctx: UpdateContext, rows: Rows, nxt: bool) -> Tensor:
    table = ctx.sched.next_timesteps if nxt else ctx.sched.timesteps
    return table.to(rows.x.device)[rows.step_index]


def _alpha(ctx: UpdateContext, rows: Rows, nxt: bool) -> Tensor:
    return ctx.sched.gather("alpha_next" if nxt else "alpha_cur", rows.step_index, rows.x)


def _flow_cond(ctx: UpdateContext, rows: Rows) -> Tensor:
    embeds = as_conditioning(rows.cond).prompt_embeds  # g_φ attends to the prompt states only
    return torch.zeros_like(embeds) if ctx.settings.flow_zero_prompt else embeds


def _flow(ctx: UpdateContext, x: Tensor, t: Tensor, rows: Rows) -> Tensor:
    cond = _flow_cond(ctx, rows)
    return ctx.flow_model(x, t, encoder_hidden_states=cond.to(x.dtype)).sample


def reward_grad_at(ctx: UpdateContext, rows: Rows, nxt: bool) -> Tensor:
    """Raw ``∇_{x_s} R(decode(x̂0(x_s)))`` at ``x_{t-1}`` (``nxt``) or ``x_t``, no parameter graph kept.

    ``x̂0`` is predicted by the current LoRA policy; at the last transition's next state (timestep 0)
    ``x̂0 = x_{t-1}`` and the UNet is not called.  Returns (N, C, H, W), detached.
    """
    x = (rows.x_next if nxt else rows.x).detach().requires_grad_(True)
    alpha = _alpha(ctx, rows, nxt)
    if nxt:
        x0 = x.clone()
        live = ~rows.end
        if live.any():
            sub = rows.take(live.nonzero().squeeze(1))
            eps = ctx.eps_fn(x[live], _timesteps(ctx, sub, True), sub.cond)
            x0 = x0.index_put((live.nonzero().squeeze(1),), pred_x0(x[live], eps, alpha[live]))
    else:
        x0 = pred_x0(x, ctx.eps_fn(x, _timesteps(ctx, rows, False), rows.cond), alpha)
    reward = ctx.latent_reward(x0, rows.prompts)
    return ctx.scaler.input_grad(reward.sum(), x)


def reference_scores(ctx: UpdateContext, rows: Rows, need_reverse: bool) -> tuple:
    """``s_F^ref(x_{t-1})`` and ``∇_{x_t} log P_F^ref`` (× pretrained_strength), detached."""
    strength = ctx.settings.pretrained_strength
    x = rows.x.detach().requires_grad_(need_reverse)
    with reference_policy(ctx.unet), torch.set_grad_enabled(need_reverse):
        eps_ref = ctx.eps_fn(x, _timesteps(ctx, rows, False), rows.cond)
        mean = step_mean(ctx.sched, rows.step_index, x.detach(), eps_ref.detach())
        s_next = strength * forward_score(ctx.sched, rows.step_index, rows.x_next, mean)
        s_cur = None
        if need_reverse:
            s_cur = strength * ctx.scaler.check(reverse_score(ctx.sched, rows.step_index, x, eps_ref, rows.x_next,
                                                              grad_scale=ctx.scaler.scale))
    return s_next.detach(), s_cur


def _cat_chunks(fn: Callable[[Rows], object], rows: Rows, size: int):
    outs = [fn(c) for c in rows.chunk(size)]
    if isinstance(outs[0], tuple):
        return tuple(None if o[0] is None else torch.cat(o) for o in zip(*outs))
    return torch.cat(outs)


def _loss(ctx: UpdateContext, rows: Rows, eps: Tensor, x: Tensor, s_next_ref: Tensor,
          s_cur_ref: Optional[Tensor], r_next: Tensor, r_cur: Optional[Tensor],
          row_norm: float, end_norm: float):
    """Policy scores and flow outputs with graphs, then the loss of these rows."""
    st, sched = ctx.settings, ctx.sched
    mean = step_mean(sched, rows.step_index, x.detach(), eps)
    s_next = forward_score(sched, rows.step_index, rows.x_next, mean)
    flow_cur = flow_next = s_cur = None
    if ctx.flow_model is not None:
        s_cur = ctx.scaler.check(reverse_score(sched, rows.step_index, x, eps, rows.x_next, retain_graph=True,
                                               grad_scale=ctx.scaler.scale))
        flow_next = _flow(ctx, rows.x_next, _timesteps(ctx, rows, True), rows)
        flow_cur = _flow(ctx, rows.x.detach(), _timesteps(ctx, rows, False), rows)
    reverse_scale = st.reverse_loss_scale if ctx.flow_model is not None else 0.0
    return nabla_db_loss(
        s_next, s_next_ref, s_cur, s_cur_ref, flow_cur, flow_next, r_next, r_cur,
        _alpha(ctx, rows, True).flatten(), _alpha(ctx, rows, False).flatten(), rows.end, eps,
        rows.eps_sampled, st.reward_scale, reverse_scale, st.unet_reg_scale, st.reward_adaptive_mode,
        row_norm=row_norm, end_norm=end_norm)


# ----------------------------------------------------------------------------- the three schedules

def _naive(ctx: UpdateContext, rows: Rows, row_norm: float, end_norm: float, scale: float):
    residual = ctx.flow_model is not None
    t = _timesteps(ctx, rows, False)
    x = rows.x.detach().requires_grad_(True)
    # 1. reference policy at x_t, with a graph for its reverse score
    with memtrack.phase("reference"):
        s_next_ref, s_cur_ref = reference_scores(ctx, rows, need_reverse=True)
    # 2. the LoRA policy at x_t: graph kept until the final backward
    with memtrack.phase("policy"):
        eps = ctx.eps_fn(x, t, rows.cond)
    # 3. LoRA UNet at x_{t-1} + VAE + reward, with graphs, for the reward gradient
    with memtrack.phase("reward_grad_next"):
        xn = rows.x_next.detach().requires_grad_(True)
        eps_n = ctx.eps_fn(xn, _timesteps(ctx, rows, True), rows.cond)
        x0n = torch.where(rows.end.view(-1, 1, 1, 1), xn, pred_x0(xn, eps_n, _alpha(ctx, rows, True)))
        r_next = ctx.scaler.input_grad(ctx.latent_reward(x0n, rows.prompts).sum(), xn)
    # 4. residual mode: a second VAE + reward graph hanging off the x_t graph
    r_cur = None
    if residual:
        with memtrack.phase("reward_grad_cur"):
            x0 = pred_x0(x, eps, _alpha(ctx, rows, False))
            r_cur = ctx.scaler.input_grad(ctx.latent_reward(x0, rows.prompts).sum(), x, retain_graph=True)
    with memtrack.phase("train"):
        terms = _loss(ctx, rows, eps, x, s_next_ref, s_cur_ref if residual else None, r_next.detach(),
                      None if r_cur is None else r_cur.detach(), row_norm, end_norm)
        ctx.scaler.backward(terms.loss * scale)
    return [terms]


def _official(ctx: UpdateContext, rows: Rows, row_norm: float, end_norm: float, scale: float):
    """The naive passes slot by slot (``B`` rows each), one backward per slot, as the official loop.

    ``row_norm`` / ``end_norm`` stay the batch's, so the slots' losses sum to the batch loss."""
    out = []
    for slot_rows in rows.slots():
        out += _naive(ctx, slot_rows, row_norm, end_norm, scale)
    return out


def _optimized(ctx: UpdateContext, rows: Rows, row_norm: float, end_norm: float, scale: float):
    residual = ctx.flow_model is not None
    size = ctx.input_grad_chunk
    # 1. detached quantities, each in its own scope, chunk by chunk (rows are independent)
    with memtrack.phase("reward_grad_next"):
        r_next = _cat_chunks(lambda c: reward_grad_at(ctx, c, nxt=True), rows, size)
    r_cur = None
    if residual:
        with memtrack.phase("reward_grad_cur"):
            live = (~rows.end).nonzero().squeeze(1)
            r_cur = torch.zeros_like(rows.x)
            if live.numel():  # y_B = 0 on last transitions: their reward score at x_t is not needed
                r_cur[live] = _cat_chunks(lambda c: reward_grad_at(ctx, c, nxt=False), rows.take(live), size)
    with memtrack.phase("reference"):
        s_next_ref, s_cur_ref = _cat_chunks(lambda c: reference_scores(ctx, c, residual), rows, size)
    # 2. the graph that trains, chunk by chunk, gradients accumulated
    out = []
    with memtrack.phase("train"):
        for lo in range(0, len(rows), ctx.train_chunk or len(rows)):
            idx = slice(lo, lo + (ctx.train_chunk or len(rows)))
            out.append(train_pass(ctx, rows.take(idx), s_next_ref[idx],
                                  None if s_cur_ref is None else s_cur_ref[idx], r_next[idx],
                                  None if r_cur is None else r_cur[idx], row_norm, end_norm, scale))
    return out


def train_pass(ctx: UpdateContext, rows: Rows, s_next_ref: Tensor, s_cur_ref: Optional[Tensor],
               r_next: Tensor, r_cur: Optional[Tensor], row_norm: float, end_norm: float,
               scale: float):
    """The one graph that trains: policy (and flow) outputs of these rows, loss, backward.

    The detached inputs are this chunk's rows of the reference scores and raw reward gradients
    (N, C, H, W). Adds ``scale * ∂L_rows/∂θ, ∂L_rows/∂φ`` to ``.grad``; returns the loss terms.
    """
    residual = ctx.flow_model is not None
    x = rows.x.detach().requires_grad_(residual)
    eps = ctx.eps_fn(x, _timesteps(ctx, rows, False), rows.cond)
    terms = _loss(ctx, rows, eps, x, s_next_ref, s_cur_ref, r_next, r_cur, row_norm, end_norm)
    ctx.scaler.backward(terms.loss * scale)
    return terms


def accumulate_gradients(ctx: UpdateContext, rows: Rows, row_norm: float, end_norm: float,
                         scale: float = 1.0) -> Dict[str, float]:
    """Add ``scale * ∂L/∂θ, ∂L/∂φ`` of these rows to the parameters' ``.grad``.

    ``row_norm`` / ``end_norm`` are the divisors of the whole batch (rows and last transitions) so
    that chunks sum to the batch loss.  Returns the loss terms of these rows (summed over chunks).
    """
    fn = {"naive": _naive, "official": _official}.get(ctx.mode, _optimized)
    terms = fn(ctx, rows, row_norm, end_norm, scale)
    totals: Dict[str, float] = {}
    for t in terms:
        for k, v in t.scalars().items():
            totals[k] = totals.get(k, 0.0) + v
    return totals
