"""The one training loop: set-up, then per epoch sample -> reward -> train, one optimiser update at a
time.  :func:`run_epoch` is the loop's body; :func:`~lowmem_nablagfn.trainer.train` (the ``train``
command) and :func:`~lowmem_nablagfn.profiler.run_profile` (the ``profile`` command, with its phase
marks) both run it, so what is profiled is what trains.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import distributed as dist
from . import memtrack
from .config import Config, validate
from .diffusion import StepSchedule, make_schedule
from .dtypes import to_dtype
from .images import decode_latents
from .memory import Batches, LossScaler, MemoryPlan, Rows, UpdateContext, accumulate_gradients, build_plan
from .models import SDParts, check_attention_backend, load_run_parts, prepare_for_training
from .rewards import MixtureReward, build_reward
from .rewards.mixture import component_metrics, grad_shares
from .rewards.prompts import load_prompts
from .sampling import Trajectories, sample
from .update import make_latent_reward
from .update import policy_eps_fn as policy_eps_fn_of
from .update import update_context as context_of
from .subsample import draw_indices, num_blocks, num_counters


@dataclass
class Components:
    """What :func:`setup` builds; the loop only reads it."""

    cfg: Config
    device: torch.device
    parts: SDParts
    lora_params: List[nn.Parameter]
    flow_model: Optional[nn.Module]
    reward_model: nn.Module
    sched: StepSchedule
    optimizer: Optional[torch.optim.Optimizer]  # None under DeepSpeed: its engines own the optimisers
    prompts: List[str]
    uncond: Tensor
    run_dir: Path
    k: int
    latent_shape: tuple
    plan: MemoryPlan
    """The run's memory plan, built once (:func:`setup`): every memory knob and the row arithmetic."""
    sync: Optional[dist.GradientSync] = None  # gradient averaging / ZeRO: the one update path
    nonfinite_streak: int = 0  # updates skipped in a row for a non-finite loss or gradient
    optimizer_steps: int = 0  # optimiser steps taken (skipped updates do not count)

    @property
    def trainable(self) -> Dict[str, List[nn.Parameter]]:
        groups = {"lora": self.lora_params}
        if self.flow_model is not None:
            groups["flow"] = list(self.flow_model.parameters())
        return groups


# ----------------------------------------------------------------------------- set-up helpers

def epoch_seed(cfg: Config, epoch: int, purpose: int) -> int:
    """Independent seeds per (run seed, epoch, rank, purpose): resumable without RNG state."""
    return (cfg.seed * 1_000_003 + (epoch + 7) * 10_007 + dist.rank() * 101 + purpose) % (2**62)


def build_optimizer(cfg: Config, lora_params, flow_model) -> torch.optim.Optimizer:
    """AdamW with two parameter groups (LoRA, flow model); torch or bitsandbytes 8-bit."""
    t = cfg.training
    groups = [{"params": lora_params, "lr": t.learning_rate, "weight_decay": t.adam_weight_decay,
               "name": "lora"}]
    if flow_model is not None:
        groups.append({"params": list(flow_model.parameters()), "lr": t.flow_learning_rate,
                       "weight_decay": t.flow_weight_decay, "name": "flow"})
    kw = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kw)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(f"training.optimizer={t.optimizer} needs bitsandbytes: "
                          f"pip install 'lowmem-nablagfn[bnb]', or use training.optimizer=adamw") from exc
    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, **kw)


def setup(cfg: Config, run_dir: Optional[Path] = None, plan: Optional[MemoryPlan] = None) -> Components:
    """Validate, then build models, adapter, flow model, reward, schedule and optimiser.  ``plan``:
    the run's memory plan if the caller built it already (``train``'s fit check); else built here."""
    validate(cfg)
    plan = plan if plan is not None else build_plan(cfg)
    device = dist.pick_device(cfg.device)
    dist.init_process_group(device, cfg.distributed)  # when a launcher started us (RANK, WORLD_SIZE)
    if cfg.training.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = run_dir or Path(cfg.logging.output_dir) / cfg.logging.run_name
    prompts = load_prompts(cfg.prompts.set, cfg.prompts.split)

    check_attention_backend(plan.placement.attention, device)  # before the (slow) model load
    # SD 3.x: the prompts' embeddings first (cached; text encoders only on a miss), then transformer + VAE
    parts = load_run_parts(cfg, device, to_dtype(cfg.training.mixed_precision))
    # the model's own betas, spacing and prediction type (an unsupported one is refused here)
    sched = make_schedule(cfg.sampling.scheduler, cfg.sampling.num_steps, cfg.sampling.eta, parts.scheduler_config)
    trainable = prepare_for_training(cfg, parts, device)  # frozen parts cast, LoRA, flow model
    lora_params, flow_model, latent_shape = trainable.lora_params, trainable.flow_model, trainable.latent_shape
    reward_model = build_reward(cfg.reward, device)
    placement = plan.placement
    placement.apply_checkpointing(parts.denoiser, parts.vae, reward_model, flow_model)
    optimizer = build_optimizer(cfg, lora_params, flow_model)
    scaler = LossScaler(enabled=cfg.training.mixed_precision == "fp16",  # fp16: every backward scaled
                        params=[p for group in optimizer.param_groups for p in group["params"]])
    sync = dist.make_gradient_sync(cfg.distributed, optimizer, cfg.training.max_grad_norm,
                                   cfg.training.batch_size, scaler)  # DeepSpeed: engines own the optimisers
    uncond = parts.uncond(device, cfg.sampling.resolution)
    placement.place(parts)  # the VAE encoder (and offloaded text encoders) to host memory
    k = num_blocks(cfg.sampling.num_steps, cfg.model.timestep_fraction)
    return Components(cfg, device, parts, lora_params, flow_model, reward_model, sched, sync.optimizer,
                      prompts, uncond, run_dir, k, latent_shape, plan, sync=sync)


# ----------------------------------------------------------------------------- epoch parts

def sample_epoch(c: Components, epoch: int) -> Trajectories:
    """Sample ``num_batches_per_epoch × batch_size`` trajectories, keeping only trained transitions."""
    cfg, s = c.cfg, c.cfg.sampling
    gen = torch.Generator().manual_seed(epoch_seed(cfg, epoch, 0))
    eps_fn = policy_eps_fn(c)
    placement = c.plan.placement
    storage = placement.storage_dtype
    out = []
    for b in range(s.num_batches_per_epoch):
        choice = torch.randint(len(c.prompts), (s.batch_size,), generator=gen).tolist()
        prompts = [c.prompts[i] for i in choice]
        cond = encode(c, prompts)
        keep = draw_indices(s.batch_size, s.num_steps, c.k, s.low_var_subsampling,
                            seed=epoch_seed(cfg, epoch, 1),
                            offset=b * num_counters(s.batch_size, s.num_steps, c.k, s.low_var_subsampling))
        with memtrack.phase("sampling"):
            traj = sample(eps_fn, c.sched, cond, c.latent_shape, gen, keep=placement.sampler_keep(keep),
                          prompts=prompts, device=c.device, storage_dtype=storage)
        memtrack.count("sampling", s.batch_size)
        traj = placement.kept(traj, keep)
        traj.rewards = final_rewards(c, traj.final_latents, prompts)
        out.append(placement.park(traj))
    return Trajectories.cat(out)


@torch.no_grad()
def final_rewards(c: Components, latents: Tensor, prompts: List[str]) -> Tensor:
    with memtrack.phase("final_reward"):
        rewards = make_latent_reward(c.parts.vae, c.reward_model)(latents, prompts).float()
    if isinstance(c.reward_model, MixtureReward):  # its components' scores, for the epoch's metrics
        c.reward_model.log_last()
    return rewards


def mixture_metrics(c: Components, fresh: Trajectories) -> Dict[str, float]:
    """A mixture's components: mean and std of each over the epoch's samples (every rank), and each one's
    share of the reward gradient norm at the first rows' final images (:mod:`~lowmem_nablagfn.rewards.mixture`;
    rows: as many as one input-gradient pass holds, so that the pass fits where training's does)."""
    reward = c.reward_model
    out = component_metrics({k: dist.gather_tensor(v.to(c.device)) for k, v in reward.pop_log().items()})
    n = min(fresh.batch_size, c.plan.phase("reward_grad_next").call_rows(c.plan.batches.train_batch))
    with memtrack.phase("reward_shares"):
        with torch.no_grad():
            images = decode_latents(c.parts.vae, fresh.final_latents[:n].to(c.device))
        out.update(grad_shares(dist.mean_over_ranks(reward.gradient_sq_norms(images, fresh.prompts[:n]))))
    return out


@torch.no_grad()
def encode(c: Components, prompts: List[str]) -> Tensor:
    """Prompt embeddings (B, L, D) on the device (SDXL: a ``Conditioning`` with pooled embeddings
    and time ids; SD 3.x: with pooled embeddings, rows of the cached prompt table); with
    ``memory.offload_text_encoder`` the text encoders are moved to the device for this call only and
    back to the CPU after it."""
    parts = c.parts
    with memtrack.phase("encode"), c.plan.placement.encoders_on(parts, c.device):
        return parts.encode(prompts, c.device, c.cfg.sampling.resolution)


def policy_eps_fn(c: Components):
    """Guided ε (SD 3.x: the velocity) of the run's denoiser as it is now
    (:func:`~lowmem_nablagfn.update.policy_eps_fn`)."""
    return policy_eps_fn_of(c.parts.denoiser, c.uncond, c.cfg.sampling.guidance_scale, c.sched)


def update_context(c: Components) -> UpdateContext:
    """The executor's view of the run's models (:func:`~lowmem_nablagfn.update.update_context`)."""
    return context_of(c.cfg, c.parts.denoiser, c.parts.vae, c.reward_model, c.flow_model, c.uncond, c.sched,
                      plan=c.plan, scaler=c.sync.scaler)


def optimizer_step(c: Components) -> Dict[str, float]:
    """Average gradients across ranks (or ZeRO reduce-scatter), clip each group, take exactly one
    optimiser step (:class:`~lowmem_nablagfn.distributed.GradientSync`)."""
    with memtrack.phase("optimizer"):
        stats = c.sync.step()
    c.optimizer_steps += 1
    return stats


def guarded_step(c: Components, epoch: int, update: int, bad_terms: List[str]) -> Dict[str, float]:
    """:func:`optimizer_step`, unless a loss term or gradient of this update is inf/NaN on any rank:
    then every rank drops the gradients (weights and optimiser state untouched), one warning line names
    the cause, and ``training.max_nonfinite_updates`` such updates in a row raise
    :class:`~lowmem_nablagfn.checkpoint.NonFiniteError`.  An fp16 overflow is never the cause: the pass
    that overflowed was run again at a lower loss scale (:class:`~lowmem_nablagfn.memory.LossScaler`),
    so what reaches here is non-finite in the forward pass or at every scale."""
    bad = list(dict.fromkeys(bad_terms)) + c.sync.nonfinite_gradients()
    if not dist.any_rank(bool(bad)):
        c.nonfinite_streak = 0
        return optimizer_step(c)
    c.sync.skip()
    scaler = c.sync.scaler
    why = ""
    if scaler is not None and scaler.enabled:
        scaler.skipped()
        why = (" (not an fp16 overflow: non-finite in the forward pass, or still at the lowest loss scale, "
               f"{scaler.min_scale:g})")
    c.nonfinite_streak += 1
    limit = c.cfg.training.max_nonfinite_updates
    what = ", ".join(bad) if bad else "values on another rank"
    if dist.is_main():
        print(f"lowmem-nablagfn: warning: epoch {epoch}, update {update}: non-finite {what}{why}; update skipped "
              f"({c.nonfinite_streak}/{limit} in a row)", file=sys.stderr)
    if c.nonfinite_streak >= limit:
        raise ckpt.NonFiniteError(f"{limit} updates in a row had a non-finite loss or gradient (last: epoch {epoch}, "
                                  f"update {update}: {what}); stopped. {ckpt.LIKELY_CAUSES}")
    return {}


def train_epoch(c: Components, data: Trajectories, epoch: int, progress=None) -> Dict[str, float]:
    """Shuffle trajectories, train in batches, one optimiser step every ``accumulation`` batches.

    Returns the means per batch of the loss terms and step statistics, and two counts of the epoch:
    ``train/skipped_updates`` (non-finite updates, :func:`guarded_step`; present under fp16 or when
    not 0) and, under fp16, ``train/scale_retries`` (passes run again at a lower loss scale)."""
    t = c.cfg.training
    gen = torch.Generator().manual_seed(epoch_seed(c.cfg, epoch, 2))
    order = torch.randperm(data.batch_size, generator=gen)
    ctx = update_context(c)
    if c.flow_model is not None:
        c.flow_model.train()
    sums: Dict[str, float] = {}
    n_batches, bad, steps_before = 0, [], c.optimizer_steps
    for i, rows_idx in enumerate(order.split(t.batch_size)):
        rows = Rows.from_trajectories(data.select(rows_idx), c.sched.num_steps, c.device)
        row_norm, end_norm = rows.norms(data.step_index.shape[1])
        terms = {k: float(v) for k, v in accumulate_gradients(ctx, rows, row_norm=row_norm, end_norm=end_norm,
                                                              scale=1.0 / t.gradient_accumulation_steps).items()}
        memtrack.count("train", len(rows))
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        bad += [k for k, v in terms.items() if not math.isfinite(v)]
        n_batches += 1
        if (i + 1) % t.gradient_accumulation_steps == 0:
            for k, v in guarded_step(c, epoch, i // t.gradient_accumulation_steps, bad).items():
                sums[k] = sums.get(k, 0.0) + v * t.gradient_accumulation_steps
            bad = []
        if progress is not None:
            progress(1)
    out = {f"train/{k}": v / n_batches for k, v in sums.items()}
    skipped = n_batches // t.gradient_accumulation_steps - (c.optimizer_steps - steps_before)
    scaler = c.sync.scaler
    if scaler is not None and scaler.enabled:
        out["train/scale_retries"] = float(scaler.pop_retries())
    if skipped or "train/scale_retries" in out:
        out["train/skipped_updates"] = float(skipped)
    return out


@torch.no_grad()
def sample_grid(c: Components, n: int, seed: int = 1234) -> tuple:
    """Fixed-seed samples of the current policy (same seeds and prompts every epoch).

    Returns (latents (n, C, h, w), images (n, 3, H, W) in [0, 1], prompts).
    """
    prompts = [c.prompts[i % len(c.prompts)] for i in range(n)]
    cond = encode(c, prompts)
    gen = torch.Generator().manual_seed(seed)
    eps_fn = policy_eps_fn(c)
    traj = sample(eps_fn, c.sched, cond, c.latent_shape, gen, keep=torch.zeros(n, 0, dtype=torch.long),
                  prompts=prompts, device=c.device)
    return traj.final_latents, decode_latents(c.parts.vae, traj.final_latents), prompts

def run_epoch(c: Components, epoch: int, buffer: Optional[Trajectories]) -> Tuple[Trajectories, Dict[str, float]]:
    """One epoch: sample with the current policy (no graph, only the transitions that will train),
    then train on the previous epoch's samples (``buffer``: the official one-epoch lag) or on these
    (``training.on_policy``).  Epoch -1 of the lagged loop only samples.

    Returns the fresh samples (the next epoch's ``buffer``) and the epoch's metrics.  The phases
    ``round_sample`` / ``round_update`` are the profiler's marks (no-ops when nothing records)."""
    t0 = time.perf_counter()
    with memtrack.phase("round_sample"):
        fresh = sample_epoch(c, epoch)
    rewards = dist.gather_tensor(fresh.rewards.to(c.device))
    metrics = {"reward/mean": float(rewards.mean()),
               "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
               "reward/max": float(rewards.max()), "time/sample_s": time.perf_counter() - t0}
    if isinstance(c.reward_model, MixtureReward):
        metrics.update(mixture_metrics(c, fresh))
    data = fresh if c.plan.batches.held_epochs == 1 else buffer  # on-policy, or the official one-epoch lag
    if data is not None and epoch >= 0:
        t1 = time.perf_counter()
        with memtrack.phase("round_update"):
            metrics.update(dist.mean_over_ranks(train_epoch(c, data, epoch)))
        metrics["time/train_s"] = time.perf_counter() - t1
    return fresh, metrics


def updates_per_epoch(cfg: Config) -> int:
    """Optimiser updates of one epoch (:attr:`~lowmem_nablagfn.memory.Batches.updates_per_epoch`)."""
    return Batches.of(cfg).updates_per_epoch
