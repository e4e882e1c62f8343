"""The training loop: sample -> reward -> train, composed from the package's parts.

``train(cfg)`` reads top to bottom; set-up lives in :func:`setup` and the small helpers below.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import distributed as dist
from . import memtrack
from .config import Config, to_dict, validate
from .diffusion import StepSchedule, as_epsilon, make_schedule
from .memory import LossScaler, ObjectiveSettings, Rows, UpdateContext, accumulate_gradients, apply_checkpointing
from .models import SDParts, add_lora, check_attention_backend, build_flow_model, freeze, load_sd, vae_encoder_modules
from .rewards import build_reward
from .rewards.prompts import load_prompts
from .sampling import TRANSITION_DTYPES, Trajectories, cfg_eps_fn, sample
from .subsample import draw_indices, gather, num_blocks, num_counters

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


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
    logger: "MetricLogger"
    step_hooks: List[Callable] = field(default_factory=list)
    sync: Optional[dist.GradientSync] = None  # gradient averaging / ZeRO: the one update path
    nonfinite_streak: int = 0  # updates skipped in a row for a non-finite loss or gradient

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


def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


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


def make_latent_reward(vae: nn.Module, reward_model: nn.Module):
    """``R(decode(x0))``: VAE decode in its storage dtype, reward in float32."""
    scale = vae.config.scaling_factor
    dtype = next(vae.parameters()).dtype

    def latent_reward(x0: Tensor, prompts) -> Tensor:
        images = vae.decode((x0 / scale).to(dtype)).sample.float()
        return reward_model((images / 2 + 0.5).clamp(0, 1), prompts)

    return latent_reward


def setup(cfg: Config, run_dir: Optional[Path] = None) -> Components:
    """Validate, then build models, adapter, flow model, reward, schedule and optimiser."""
    validate(cfg)
    device = pick_device(cfg)
    dist.init_process_group(device, cfg.distributed)  # when a launcher started us (RANK, WORLD_SIZE)
    if cfg.training.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = run_dir or Path(cfg.logging.output_dir) / cfg.logging.run_name
    prompts = load_prompts(cfg.prompts.set, cfg.prompts.split)

    check_attention_backend(cfg.memory.attention, device)  # before the (slow) model load
    parts = load_sd(cfg.pretrained.model, cfg.pretrained.revision, cfg.pretrained.seed, cfg.pretrained.vae)
    # the model's own betas, spacing and prediction type (an unsupported one is refused here)
    sched = make_schedule(cfg.sampling.scheduler, cfg.sampling.num_steps, cfg.sampling.eta, parts.scheduler_config)
    frozen = DTYPES[cfg.training.mixed_precision]
    for module in (parts.unet, parts.vae, *parts.text_encoders):
        freeze(module, device, parts.frozen_dtype(module, frozen))  # SDXL VAE: no fp16 (overflows)
    for module in vae_encoder_modules(parts.vae):  # training only decodes: the encoder stays in host memory
        module.to("cpu")  # (planner.static_sizes counts it off the accelerator)
    lora = cfg.model.lora
    lora_params = add_lora(parts.unet, lora.rank, lora.target_modules, lora.init, cfg.seed)
    latent_size = cfg.sampling.resolution // parts.vae_scale_factor
    latent_shape = (parts.unet.config.in_channels, latent_size, latent_size)
    flow_model = None
    if not cfg.model.no_flow:
        flow_model = build_flow_model(latent_shape[0], latent_size, parts.prompt_embed_dim,
                                      list(cfg.model.flow_block_widths), cfg.seed).to(device).train()
    reward_model = build_reward(cfg.reward, device)
    apply_checkpointing(parts.unet, parts.vae, reward_model, flow_model, cfg.memory)
    optimizer = build_optimizer(cfg, lora_params, flow_model)
    scaler = LossScaler(enabled=cfg.training.mixed_precision == "fp16")  # fp16: every backward scaled
    sync = dist.make_gradient_sync(cfg.distributed, optimizer, cfg.training.max_grad_norm,
                                   cfg.training.batch_size, scaler)  # DeepSpeed: engines own the optimisers
    uncond = parts.uncond(device, cfg.sampling.resolution)
    if cfg.memory.offload_text_encoder:
        for te in parts.text_encoders:
            te.to("cpu")  # visits the device only inside encode()
    k = num_blocks(cfg.sampling.num_steps, cfg.model.timestep_fraction)
    logger = MetricLogger(run_dir, cfg) if dist.is_main() else MetricLogger(None, cfg)
    return Components(cfg, device, parts, lora_params, flow_model, reward_model, sched, sync.optimizer,
                      prompts, uncond, run_dir, k, latent_shape, logger, sync=sync)


# ----------------------------------------------------------------------------- epoch parts

def sample_epoch(c: Components, epoch: int) -> Trajectories:
    """Sample ``num_batches_per_epoch × batch_size`` trajectories, keeping only trained transitions."""
    cfg, s = c.cfg, c.cfg.sampling
    gen = torch.Generator().manual_seed(epoch_seed(cfg, epoch, 0))
    eps_fn = policy_eps_fn(c)
    storage = TRANSITION_DTYPES[cfg.memory.transition_dtype]
    out = []
    for b in range(s.num_batches_per_epoch):
        choice = torch.randint(len(c.prompts), (s.batch_size,), generator=gen).tolist()
        prompts = [c.prompts[i] for i in choice]
        cond = encode(c, prompts)
        keep = draw_indices(s.batch_size, s.num_steps, c.k, s.low_var_subsampling,
                            seed=epoch_seed(cfg, epoch, 1),
                            offset=b * num_counters(s.batch_size, s.num_steps, c.k, s.low_var_subsampling))
        with memtrack.phase("sampling"):
            traj = sample(eps_fn, c.sched, cond, c.latent_shape, gen,
                          keep=keep if cfg.memory.store_only_trained else None, prompts=prompts,
                          device=c.device, storage_dtype=storage)
        memtrack.count("sampling", s.batch_size)
        if not cfg.memory.store_only_trained:
            picked = gather({"latents": traj.latents, "next_latents": traj.next_latents,
                             "eps_sampled": traj.eps_sampled}, keep.to(c.device))
            traj = Trajectories(step_index=keep.to(c.device), prompt_embeds=traj.prompt_embeds,
                                final_latents=traj.final_latents, prompts=traj.prompts, **picked)
        traj.rewards = final_rewards(c, traj.final_latents, prompts)
        out.append(traj.to("cpu") if cfg.memory.offload_trajectories else traj)
    return Trajectories.cat(out)


@torch.no_grad()
def final_rewards(c: Components, latents: Tensor, prompts: List[str]) -> Tensor:
    with memtrack.phase("final_reward"):
        return make_latent_reward(c.parts.vae, c.reward_model)(latents, prompts).float()


@torch.no_grad()
def encode(c: Components, prompts: List[str]) -> Tensor:
    """Prompt embeddings (B, L, D) on the device (SDXL: a ``Conditioning`` with pooled embeddings
    and time ids); with ``memory.offload_text_encoder`` the text encoders are moved to the device
    for this call only and back to the CPU after it."""
    parts, res = c.parts, c.cfg.sampling.resolution
    with memtrack.phase("encode"):
        if not c.cfg.memory.offload_text_encoder:
            return parts.encode(prompts, c.device, res)
        for te in parts.text_encoders:
            te.to(c.device)
        try:
            return parts.encode(prompts, c.device, res)
        finally:
            for te in parts.text_encoders:
                te.to("cpu")


def flatten(traj: Trajectories, num_steps: int, device) -> Rows:
    """(B, S) trajectories -> B·S rows of float32 transitions on ``device``."""
    b, s = traj.step_index.shape
    step = traj.step_index.reshape(-1).to(device)
    return Rows(
        x=traj.latents.flatten(0, 1).to(device, torch.float32),
        x_next=traj.next_latents.flatten(0, 1).to(device, torch.float32),
        eps_sampled=traj.eps_sampled.flatten(0, 1).to(device, torch.float32),
        step_index=step,
        cond=traj.prompt_embeds.to(device).repeat_interleave(s, 0),
        prompts=[p for p in traj.prompts for _ in range(s)],
        end=step == num_steps - 1,
        slot=torch.arange(s, device=device).repeat(b),
    )


def policy_eps_fn(c: Components):
    """Guided ε of the UNet as it is now (LoRA on unless inside ``reference_policy``), whatever the
    model predicts (v-prediction converted, :func:`~lowmem_nablagfn.diffusion.as_epsilon`)."""
    return as_epsilon(cfg_eps_fn(c.parts.unet, c.uncond, c.cfg.sampling.guidance_scale), c.sched)


def update_context(c: Components) -> UpdateContext:
    m, mem = c.cfg.model, c.cfg.memory
    return UpdateContext(
        eps_fn=policy_eps_fn(c),
        unet=c.parts.unet, flow_model=c.flow_model,
        latent_reward=make_latent_reward(c.parts.vae, c.reward_model), sched=c.sched,
        settings=ObjectiveSettings(m.reward_scale, m.reverse_loss_scale, m.unet_reg_scale,
                                   m.pretrained_strength, m.reward_adaptive_mode, m.flow_zero_prompt),
        mode=mem.mode, input_grad_chunk=mem.input_grad_chunk, train_chunk=mem.train_chunk,
        scaler=c.sync.scaler or LossScaler())


def optimizer_step(c: Components) -> Dict[str, float]:
    """Average gradients across ranks (or ZeRO reduce-scatter), clip each group, take exactly one
    optimiser step (:class:`~lowmem_nablagfn.distributed.GradientSync`)."""
    with memtrack.phase("optimizer"):
        stats = c.sync.step()
    for hook in c.step_hooks:
        hook()
    return stats


def guarded_step(c: Components, epoch: int, update: int, bad_terms: List[str]) -> Dict[str, float]:
    """:func:`optimizer_step`, unless a loss term or gradient of this update is inf/NaN on any rank:
    then every rank drops the gradients (weights and optimiser state untouched) with a warning, and
    ``training.max_nonfinite_updates`` such updates in a row raise
    :class:`~lowmem_nablagfn.checkpoint.NonFiniteError`."""
    bad = list(dict.fromkeys(bad_terms)) + c.sync.nonfinite_gradients()
    if not dist.any_rank(bool(bad)):
        c.nonfinite_streak = 0
        return optimizer_step(c)
    c.sync.skip()
    if c.sync.scaler is not None and c.sync.scaler.back_off():  # fp16: the scaled backward overflowed;
        return {"skipped_overflow": 1.0}  # the scale is halved, not a failure (GradScaler's rule)
    c.nonfinite_streak += 1
    limit = c.cfg.training.max_nonfinite_updates
    what = ", ".join(bad) if bad else "values on another rank"
    if dist.is_main():
        print(f"lowmem-nablagfn: warning: epoch {epoch}, update {update}: non-finite {what}; update skipped "
              f"({c.nonfinite_streak}/{limit} in a row)", file=sys.stderr)
    if c.nonfinite_streak >= limit:
        raise ckpt.NonFiniteError(f"{limit} updates in a row had a non-finite loss or gradient (last: epoch {epoch}, "
                                  f"update {update}: {what}); stopped. {ckpt.LIKELY_CAUSES}")
    return {}


def train_epoch(c: Components, data: Trajectories, epoch: int, progress=None) -> Dict[str, float]:
    """Shuffle trajectories, train in batches, one optimiser step every ``accumulation`` batches."""
    t = c.cfg.training
    gen = torch.Generator().manual_seed(epoch_seed(c.cfg, epoch, 2))
    order = torch.randperm(data.batch_size, generator=gen)
    ctx = update_context(c)
    if c.flow_model is not None:
        c.flow_model.train()
    sums: Dict[str, float] = {}
    n_batches, bad = 0, []
    for i, rows_idx in enumerate(order.split(t.batch_size)):
        rows = flatten(data.select(rows_idx), c.sched.num_steps, c.device)
        per_traj = data.step_index.shape[1]
        n_end = float(rows.end.sum())
        terms = accumulate_gradients(ctx, rows, row_norm=float(len(rows)),
                                     end_norm=(n_end + 1e-6) * per_traj,
                                     scale=1.0 / t.gradient_accumulation_steps)
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
    return {f"train/{k}": v / n_batches for k, v in sums.items()}


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
    vae = c.parts.vae
    images = vae.decode((traj.final_latents / vae.config.scaling_factor).to(next(vae.parameters()).dtype))
    return traj.final_latents, (images.sample.float() / 2 + 0.5).clamp(0, 1), prompts


# ----------------------------------------------------------------------------- logging

class MetricLogger:
    """JSON lines + TensorBoard (+ wandb) on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: Optional[Path], cfg: Config):
        self.run_dir = run_dir
        self.tb = None
        self.wandb = None
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.logging.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("logging.wandb=true needs wandb: pip install wandb") from exc
            self.wandb = wandb.init(project="lowmem-nablagfn", name=cfg.logging.run_name, config=to_dict(cfg))

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"epoch": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_grid(images: Tensor, path: Path, min_side: int = 128) -> None:
    """A square-ish grid PNG; images smaller than ``min_side`` px are enlarged by an integer factor
    (nearest neighbour: pixels stay pixels) so that a 64-px sample can be looked at."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.float().cpu()
    factor = -(-min_side // max(images.shape[-2:]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    save_image(images, str(path), nrow=max(1, int(math.ceil(math.sqrt(images.shape[0])))))


FINAL_SAMPLE = "final.safetensors"


def save_final_sample(latents: Tensor, prompts: List[str], seed: int, path: Path) -> None:
    """The final fixed-seed latents (safetensors; prompts and seed as JSON metadata)."""
    from safetensors.torch import save_file

    save_file({"latents": latents.detach().float().cpu().contiguous()}, str(path),
              metadata={"prompts": json.dumps(prompts), "seed": str(seed)})
    ckpt.usual_modes(path)  # safetensors writes 0600


def load_final_sample(path: Path) -> dict:
    """``{"latents", "prompts", "seed"}`` of :func:`save_final_sample`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return {"latents": f.get_tensor("latents"), "prompts": json.loads(meta["prompts"]), "seed": int(meta["seed"])}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------- the loop

def train(cfg: Config, resume: Optional[str] = None, stop_after_epoch: Optional[int] = None) -> Path:
    """Run (or resume) a training job; returns the run directory.

    ``stop_after_epoch`` ends the run early after that epoch's checkpoint (tests of interruption).
    """
    from tqdm.auto import tqdm

    from .report import refresh_report
    from .summary import train_summary

    t_start = time.perf_counter()
    plan = ckpt.plan_run(cfg, resume)  # before any model is built: refuse what cannot start or resume
    ckpt.start_run(plan, cfg)  # rank 0: stale temporaries, metrics cut back to the resumed epoch, config.json
    c = setup(cfg)
    run_dir, lg = c.run_dir, cfg.logging
    lag = not cfg.training.on_policy
    first = -1 if lag else 0  # the official loop's epoch -1 only samples

    # 1. resume: adapter, flow model, optimiser, the lagged sample buffer, counters
    buffer, start, global_step = None, first, 0
    if plan.checkpoint is not None:  # with this rank's own buffer, RNG and ZeRO partitions
        state = ckpt.load(plan.checkpoint, c.parts.unet, c.flow_model, c.sync)
        buffer = ckpt.buffer_from_state(state.buffer, c.device)
        start, global_step = state.epoch + 1, state.global_step

    steps_per_epoch = cfg.sampling.batch_size * cfg.sampling.num_batches_per_epoch // cfg.training.batch_size
    bar = tqdm(total=cfg.training.num_epochs - first, initial=start - first, desc="epochs",
               disable=lg.quiet or not dist.is_main(), dynamic_ncols=True)
    for epoch in range(start, cfg.training.num_epochs):
        t0 = time.perf_counter()
        # 2. sample with the current policy (no graph); keep only the transitions that will train
        bar.set_description(f"epoch {epoch}: sampling")
        fresh = sample_epoch(c, epoch)
        t_sample = time.perf_counter() - t0
        rewards = dist.gather_tensor(fresh.rewards.to(c.device))
        metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
                   "reward/max": float(rewards.max()), "time/sample_s": t_sample}
        # 3. train on the previous epoch's samples (official lag) or on these (on-policy)
        data = fresh if not lag else buffer
        if data is not None and epoch >= 0:
            t1 = time.perf_counter()
            bar.set_description(f"epoch {epoch}: training")
            metrics.update(dist.mean_over_ranks(train_epoch(c, data, epoch)))
            global_step += steps_per_epoch // cfg.training.gradient_accumulation_steps
            metrics["time/train_s"] = time.perf_counter() - t1
        buffer = fresh
        metrics.update({"time/epoch_s": time.perf_counter() - t0, "memory/peak_gb": peak_memory_gb(c.device),
                        "optimizer_steps": global_step})
        # 4. log, sample grid of fixed seeds, checkpoint (atomic)
        if dist.is_main():
            if lg.sample_grid_seeds:
                latents, images, _ = sample_grid(c, lg.sample_grid_seeds)
                save_grid(images, run_dir / "samples" / f"epoch_{epoch + 1:04d}.png")
            c.logger.log(epoch, metrics)
            refresh_report(run_dir)  # report.html: curves, grids, config (plots throttled, never raises)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.4g}", mem=f"{metrics['memory/peak_gb']:.1f}G")
        bar.update(1)
        last = epoch == cfg.training.num_epochs - 1
        if epoch >= 0 and ((epoch + 1) % lg.save_every == 0 or last or epoch == stop_after_epoch):
            # every rank: its buffer and ZeRO partitions are its own; rank 0 renames atomically
            state = ckpt.TrainingState(epoch, global_step, to_dict(cfg), c.sync.state_dict(),
                                       ckpt.buffer_state(buffer), world_size=dist.world_size())
            ckpt.save(run_dir, c.parts.unet, c.flow_model, state, c.sync, keep=lg.keep_checkpoints)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    bar.close()
    # 5. final artefacts: the LoRA in diffusers format and the final fixed-seed sample
    if dist.is_main():
        (run_dir / "lora").mkdir(parents=True, exist_ok=True)
        ckpt.save_lora(c.parts.unet, run_dir / "lora")
        if lg.sample_grid_seeds:
            latents, images, prompts = sample_grid(c, lg.sample_grid_seeds)
            save_grid(images, run_dir / "samples" / "final.png")
            save_final_sample(latents, prompts, 1234, run_dir / "samples" / FINAL_SAMPLE)
        refresh_report(run_dir, force=True)
        print(train_summary(run_dir, time.perf_counter() - t_start), flush=True)  # what happened, what next
    c.logger.close()
    c.sync.close()
    dist.barrier()
    return run_dir
