"""The ``train`` command: run (or resume) a job — the loop of :mod:`~lowmem_nablagfn.loop`, with
checkpoints, metrics, sample grids, the report and the final artefacts around it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

from torch import Tensor

from . import checkpoint as ckpt
from . import distributed as dist
from .config import Config, add_config_arguments, to_dict
from .images import save_grid
from .loop import run_epoch, sample_grid, setup
from .memory import MemoryPlan, build_plan
from .memtrack import peak_memory_gb
from .monitor import Monitor, stopped

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


# ----------------------------------------------------------------------------- the loop

def train(cfg: Config, resume: Optional[str] = None, stop_after_epoch: Optional[int] = None,
          plan: Optional[MemoryPlan] = None) -> Path:
    """Run (or resume) a training job; returns the run directory.

    ``stop_after_epoch`` ends the run early after that epoch's checkpoint (tests of interruption).
    ``plan``: the run's memory plan when the caller built it (the fit check); default: :func:`setup`'s.
    """
    from tqdm.auto import tqdm

    from .checks import setup_errors
    from .report import refresh_report
    from .summary import train_summary

    t_start = time.perf_counter()
    decision = ckpt.decide_start(cfg, resume)  # before any model is built: refuse what cannot start or resume
    with setup_errors():  # what fails here is one line (exit 2), and the run directory is still untouched
        c = setup(cfg, plan=plan)
    # rank 0, only now: --overwrite's deletions, stale temporaries, metrics cut back, config.json
    ckpt.start_run(decision, cfg)
    dist.barrier()  # no rank writes into the run directory before it is tidied
    run_dir, lg = c.run_dir, cfg.logging
    logger = MetricLogger(run_dir if dist.is_main() else None, cfg)
    monitor = Monitor(c)  # rewards not trained on, every monitor.every epochs (a no-op when monitor.rewards is empty)
    first = 0 if cfg.training.on_policy else -1  # the official loop's epoch -1 only samples

    # 1. resume: adapter, flow model, optimiser, the lagged sample buffer, counters
    buffer, start, global_step = None, first, 0
    if decision.checkpoint is not None:  # with this rank's own buffer, RNG and ZeRO partitions
        state = ckpt.load(decision.checkpoint, c.parts.denoiser, c.flow_model, c.sync)
        buffer = c.plan.placement.park(ckpt.buffer_from_state(state.buffer), c.device)  # as fresh samples are
        start, global_step = state.epoch + 1, state.global_step

    bar = tqdm(total=cfg.training.num_epochs - first, initial=start - first, desc="epochs",
               disable=lg.quiet or not dist.is_main(), dynamic_ncols=True)
    for epoch in range(start, cfg.training.num_epochs):
        # 2. sample with the current policy; train on the previous epoch's samples (or on these)
        t0 = time.perf_counter()
        bar.set_description(f"epoch {epoch}")
        steps_before = c.optimizer_steps
        buffer, metrics = run_epoch(c, epoch, buffer)
        global_step += c.optimizer_steps - steps_before  # updates skipped for non-finite values do not count
        metrics.update({"time/epoch_s": time.perf_counter() - t0, "memory/peak_gb": peak_memory_gb(c.device),
                        "optimizer_steps": global_step})
        watched, stop = monitor(epoch)  # held-out scores; stop: a hacking warning under monitor.stop=true
        metrics.update(watched)
        # 3. log, sample grid of fixed seeds, checkpoint (atomic)
        if dist.is_main():
            if lg.sample_grid_seeds:
                latents, images, _ = sample_grid(c, lg.sample_grid_seeds)
                save_grid(images, run_dir / "samples" / f"epoch_{epoch + 1:04d}.png")
            logger.log(epoch, metrics)
            refresh_report(run_dir)  # report.html: curves, grids, config (plots throttled, never raises)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.4g}", mem=f"{metrics['memory/peak_gb']:.1f}G")
        bar.update(1)
        last = epoch == cfg.training.num_epochs - 1
        if epoch >= 0 and ((epoch + 1) % lg.save_every == 0 or last or epoch == stop_after_epoch or stop):
            # every rank: its buffer and ZeRO partitions are its own; rank 0 renames atomically
            state = ckpt.TrainingState(epoch, global_step, to_dict(cfg), c.sync.state_dict(),
                                       ckpt.buffer_state(buffer), world_size=dist.world_size())
            ckpt.save(run_dir, c.parts.denoiser, c.flow_model, state, c.sync, keep=lg.keep_checkpoints)
        if stop or (stop_after_epoch is not None and epoch >= stop_after_epoch):
            break
    bar.close()
    # 4. final artefacts: the LoRA in diffusers format and the final fixed-seed sample
    if dist.is_main():
        (run_dir / "lora").mkdir(parents=True, exist_ok=True)
        ckpt.save_lora(c.parts.denoiser, run_dir / "lora")
        if lg.sample_grid_seeds:
            latents, images, prompts = sample_grid(c, lg.sample_grid_seeds)
            save_grid(images, run_dir / "samples" / "final.png")
            save_final_sample(latents, prompts, 1234, run_dir / "samples" / FINAL_SAMPLE)
        refresh_report(run_dir, force=True)
        print(train_summary(run_dir, time.perf_counter() - t_start), flush=True)  # what happened, what next
    logger.close()
    c.sync.close()
    dist.barrier()
    return run_dir


# ----------------------------------------------------------------------------- the subcommand

def add_parser(subparsers) -> None:
    """``lowmem-nablagfn train``: its flags (the contract of :mod:`lowmem_nablagfn.cli`)."""
    p = subparsers.add_parser("train", help="finetune with residual ∇-DB (or no-flow)")
    add_config_arguments(p)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue the run from its latest checkpoint (or from PATH)")
    p.add_argument("--quiet", action="append_const", dest="flag_overrides", const="logging.quiet=true",
                   help="no progress bars")
    p.add_argument("--overwrite", action="append_const", dest="flag_overrides", const="logging.overwrite=true",
                   help="start afresh in a run directory with checkpoints, deleting them (logging.overwrite=true)")
    p.add_argument("--force", action="store_true",
                   help="train even if the planner predicts the configuration does not fit the GPU")


def run(args) -> int:
    """``lowmem-nablagfn train``: ``args.cfg`` is the loaded, checked configuration.  Exit code 3 when it
    is predicted not to fit the GPU (on CUDA, without ``--force``); the CLI maps the run's errors
    (:class:`~lowmem_nablagfn.checkpoint.RunError`, ``NonFiniteError``) to its exit codes."""
    plan = build_plan(args.cfg)  # the run's one plan: the fit check and the run read it
    if not args.force:  # on CUDA: refuse a configuration predicted not to fit (CPU: no check)
        import sys

        from .planner import fit_check

        refusal = fit_check(args.cfg, plan)
        if refusal is not None:
            print(f"lowmem-nablagfn: {refusal}", file=sys.stderr)
            return 3
    run_dir = train(args.cfg, resume=args.resume, plan=plan)
    # train() printed its summary (rank 0): results, where they are, next commands; exit code 1 when the
    # reward-hacking monitor stopped the run (monitor.stop=true)
    return 1 if stopped(run_dir) else 0
