"""Finetuning the residual policy on the analytic model: residual ∇-DB, no-flow, and the DRaFT-style
reward-maximising baseline (:func:`train`).

∇-DB and no-flow train through the production update: the sampled transitions become
:class:`~lowmem_nablagfn.memory.Rows` with the trainer's batch divisors, and
:func:`~lowmem_nablagfn.memory.accumulate_gradients` runs the default memory plan on the analytic
models (:func:`update_context`), so this validation checks the executor and loss that train SD."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..diffusion import StepSchedule, step_mean
from ..memory import ObjectiveSettings, Rows, UpdateContext, UpdateFns, accumulate_gradients
from ..sampling import Trajectories, sample
from ..subsample import draw_indices
from .config import AnalyticConfig
from .exact import LinearReward
from .models import FlowMLP, ResidualEps
from .sampler import dummy_cond, model_dim, single_thread

METHODS = ("nabla_db", "no_flow", "draft")


def _clip(params: List[nn.Parameter], max_norm: float) -> None:
    if max_norm > 0 and params:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def update_context(policy: ResidualEps, flow: Optional[FlowMLP], sched: StepSchedule,
                   reward: LinearReward, cfg: AnalyticConfig) -> UpdateContext:
    """The production executor's view of the analytic models, as plain callables: policy ε =
    :class:`ResidualEps`, reference ε = its :class:`ExactEps`, flow ``g_φ`` = :class:`FlowMLP` (None:
    no-flow mode), latent reward = :class:`LinearReward` (the "latents" are the 2-D points; the
    condition and the prompts are unused).  The default plan: optimized, no chunks."""
    fns = UpdateFns(eps=lambda x, t, cond: policy(x, t),
                    ref_eps=lambda x, t, cond: policy.exact(x, t),
                    flow=None if flow is None else (lambda x, t, embeds: flow(x, t)),
                    latent_reward=lambda x0, prompts: reward(x0))
    settings = ObjectiveSettings(cfg.reward_scale, cfg.reverse_loss_scale, cfg.unet_reg_scale,
                                 reward_adaptive_mode=cfg.reward_adaptive_mode)
    return UpdateContext(fns, sched, settings)


def accumulate_update(ctx: UpdateContext, traj: Trajectories, idx: Tensor) -> Dict[str, float]:
    """Add the gradient of the batch loss of trajectories ``idx`` to ``.grad``, as the trainer does
    (:func:`~lowmem_nablagfn.loop.train_epoch`): production rows, batch divisors and executor.
    Returns the loss terms as floats."""
    rows = Rows.from_trajectories(traj.select(idx), ctx.sched.num_steps, traj.latents.device)
    row_norm, end_norm = rows.norms(traj.step_index.shape[1])
    terms = accumulate_gradients(ctx, rows, row_norm=row_norm, end_norm=end_norm)
    return {name: float(v) for name, v in terms.items()}


def draft_loss(policy: ResidualEps, sched: StepSchedule, reward: LinearReward, n: int,
               grad_steps: int, generator: torch.Generator) -> Tensor:
    """Baseline: ``-mean R(x_0)`` with the gradient through the last ``grad_steps`` sampler steps."""
    dim = model_dim(policy)
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
    sched = sched or cfg.schedule()
    torch.manual_seed(cfg.seed)
    exact = cfg.exact_model()
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
    cond, prompts = dummy_cond(cfg.num_traj), [""] * cfg.num_traj
    ctx = update_context(policy, flow, sched, reward, cfg)

    def draw(epoch: int):
        # draws of different epochs use disjoint counter ranges (a draw uses at most B*T counters)
        keep = draw_indices(cfg.num_traj, cfg.num_steps, k, cfg.low_var_subsampling,
                            seed=cfg.seed, offset=(epoch + 1) * cfg.num_traj * cfg.num_steps)
        traj = sample(lambda x, t, c: policy(x, t), sched, cond, (dim,), gen, keep=keep, prompts=prompts)
        return traj, float(reward(traj.final_latents).mean())

    buffer = None if cfg.on_policy else draw(-1)  # the official loop: epoch -1 only samples
    for epoch in range(cfg.num_epochs):
        fresh = draw(epoch)
        traj, mean_reward = fresh if cfg.on_policy else buffer
        buffer = fresh
        order = torch.randperm(cfg.num_traj, generator=gen)
        stats: Dict[str, float] = {}
        for idx in order.chunk(cfg.batches_per_epoch):
            opt.zero_grad(set_to_none=True)
            terms = accumulate_update(ctx, traj, idx)
            _clip(pol_params, cfg.max_grad_norm)
            _clip(flow_params, cfg.max_grad_norm)
            opt.step()
            lr_sched.step()
            for name, v in terms.items():
                stats[name] = stats.get(name, 0.0) + v / cfg.batches_per_epoch
        stats.update(epoch=epoch, reward=mean_reward)
        result.history.append(stats)
        if log_every and epoch % log_every == 0:
            print(f"[{method}] epoch {epoch} " + " ".join(f"{k_}={v:.4g}" for k_, v in stats.items()
                                                          if k_ != "epoch"), flush=True)
    result.seconds = time.perf_counter() - start
    return result
