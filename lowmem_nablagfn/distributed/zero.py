"""``distributed.backend=deepspeed``: DeepSpeed ZeRO-1/2 for the trainable parameters.

:class:`ZeroDataParallel` makes one DeepSpeed engine per parameter group (LoRA, flow), each ZeRO
stage 1/2 partitioning its AdamW state (and with ``offload_optimizer`` keeping it and the fp32
master weights in CPU memory).  The loss is computed outside the engines — the LoRA weights live
inside the frozen UNet and the memory plan calls ``.backward()`` itself, once per chunk — so the
engines' own per-backward reduction cannot be used (ZeRO-2 asserts that a gradient is reduced once
per backward, and its epilogue only runs after ``engine.backward``).  Instead each update runs
inside DeepSpeed's ``coalesce_grad_reduction`` window: the backward passes accumulate gradients
locally, the window's exit reduce-scatters them once (ZeRO-2: each rank keeps its partition of the
averaged gradient), ``engine.step()`` clips and steps each rank's partition and all-gathers the
updated weights into the same parameter objects the UNet and flow model use.  One engine per group
keeps the trainer's clipping of each group separately (DeepSpeed's ``gradient_clipping`` clips the
global norm of an engine's parameters).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from .group import world_size
from .sync import SHARD_DIR, GradientSync


class _Parameters(nn.Module):
    """A module that only holds parameters that live elsewhere (LoRA inside the UNet, the flow
    model's), so that a DeepSpeed engine can own their optimiser; its forward is never called."""

    def __init__(self, params: List[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)

    def forward(self, *args, **kwargs):  # pragma: no cover - the loss is computed outside
        raise RuntimeError("the trainable parameters are used by the UNet and the flow model directly")


def deepspeed_config(zero_stage: int, offload_optimizer: bool, max_grad_norm: float, micro_batch: int,
                     num_params: int, world: int) -> dict:
    """The DeepSpeed configuration of one parameter group's engine.

    The trainer accumulates its batches itself (inside one coalesced-reduction window), so DeepSpeed
    sees one micro-step per update: ``gradient_accumulation_steps`` 1.  Trainable parameters are
    fp32 (the frozen parts carry the mixed precision), so no fp16/bf16 section.  Buckets hold at
    most 5 M elements (20 MB; DeepSpeed's default 5e8 would allocate 2 GB), fewer for a smaller group.
    """
    bucket = int(max(min(num_params, 5_000_000), 100_000))
    zero = {"stage": zero_stage, "contiguous_gradients": True, "overlap_comm": False,
            "reduce_scatter": True, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world,
        "gradient_clipping": max(max_grad_norm, 0.0),
        "zero_optimization": zero,
        # torch's AdamW on the fp32 partitions: DeepSpeed's fused/CPU Adam would need a JIT build
        # (~1 min each) for a trainable set of a few million parameters that steps in milliseconds
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def _without_pickle(engine):
    """DeepSpeed reads its partitions with ``torch.load(weights_only=False)`` (code in a checkpoint
    would run); inside this block its checkpoint engine reads them with ``weights_only=True``,
    allowing only DeepSpeed's three plain record classes those files hold."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reads = []

    def load(path, map_location=None):
        reads.append(path)
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del engine.checkpoint_engine.load
    if not reads:
        raise RuntimeError("DeepSpeed no longer reads checkpoints through engine.checkpoint_engine.load; "
                           "update lowmem_nablagfn.distributed.zero._without_pickle")


class ZeroDataParallel(GradientSync):
    """DeepSpeed ZeRO-1/2 for the trainable parameters: one engine per group (see the module doc).

    Args:
        optimizer: the trainer's AdamW with named groups (``lora``, ``flow``); each group gets its
            own AdamW of the same hyper-parameters inside its engine (this one is not stepped).
        zero_stage: 1 (optimiser state partitioned) or 2 (gradients too).
        offload_optimizer: keep the fp32 master weights and AdamW state in CPU memory.
        max_grad_norm: clipping of each group's global norm (<= 0 disables).
        micro_batch: trajectories per training batch per process (DeepSpeed's bookkeeping only).
    """

    sharded = True

    def __init__(self, optimizer: torch.optim.Optimizer, zero_stage: int, offload_optimizer: bool,
                 max_grad_norm: float, micro_batch: int):
        import deepspeed

        if not hasattr(deepspeed.DeepSpeedEngine, "coalesce_grad_reduction"):
            raise ImportError(f"distributed.backend=deepspeed needs DeepSpeed >= 0.19.2 "
                              f"(engine.coalesce_grad_reduction); found {deepspeed.__version__}: "
                              f"pip install -U 'lowmem-nablagfn[deepspeed]'")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        betas, eps = optimizer.defaults["betas"], optimizer.defaults["eps"]
        self.engines = {}
        for group in optimizer.param_groups:
            params = list(group["params"])
            hyper = {k: v for k, v in group.items() if k in ("lr", "weight_decay")}
            inner = torch.optim.AdamW([{"params": params, **hyper}], betas=betas, eps=eps)
            config = deepspeed_config(zero_stage, offload_optimizer, max_grad_norm, micro_batch,
                                      sum(p.numel() for p in params), world_size())
            engine, *_ = deepspeed.initialize(model=_Parameters(params), optimizer=inner, config=config,
                                              dist_init_required=False)
            self.engines[group.get("name", f"group{len(self.engines)}")] = engine
        self._windows: Dict[str, contextlib.AbstractContextManager] = {}
        self._open_windows()

    def _open_windows(self) -> None:
        # the backward passes of the next update accumulate locally, reduced once on exit
        for name, engine in self.engines.items():
            self._windows[name] = engine.coalesce_grad_reduction()
            self._windows[name].__enter__()

    def step(self) -> Dict[str, float]:
        stats = {}
        for name, engine in self.engines.items():
            for p in engine.module.parameters():
                if p.grad is None:  # every rank must reduce the same tensors
                    p.grad = torch.zeros_like(p)
            self._windows.pop(name).__exit__(None, None, None)  # reduce(-scatter) the gradients
            engine.step()  # clip this group, step each rank's partition, all-gather the weights
            norm = engine.get_global_grad_norm()
            if norm is not None and engine.gradient_clipping() > 0:
                stats[f"grad_norm/{name}"] = float(norm)
        self._open_windows()
        return stats

    def trainable_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {name: list(engine.module.parameters()) for name, engine in self.engines.items()}

    def skip(self) -> None:
        # zeros reduce to zeros: the partitions' accumulated gradient stays zero and no step is taken
        for name, engine in self.engines.items():
            for p in engine.module.parameters():
                p.grad = torch.zeros_like(p)
            self._windows.pop(name).__exit__(None, None, None)
            engine.zero_grad()
        self._open_windows()

    def save_shards(self, directory: Path) -> None:
        """Every rank writes its optimiser partitions (DeepSpeed's format, one tag per group)."""
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(directory / "deepspeed"), tag=name, save_latest=False)

    def load(self, state: dict, checkpoint: Path) -> None:
        root = checkpoint / SHARD_DIR / "deepspeed"
        for name, engine in self.engines.items():
            if not (root / name).is_dir():
                raise FileNotFoundError(f"checkpoint {checkpoint} holds no DeepSpeed state for {name!r}: "
                                        f"it was written with distributed.backend=ddp; resume with ddp")
            self._windows.pop(name).__exit__(None, None, None)  # nothing accumulated: a no-op flush
            with _without_pickle(engine):
                path, _ = engine.load_checkpoint(str(root), tag=name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {root / name}")
        self._open_windows()

    def close(self) -> None:
        # removes ZeRO's gradient hooks and the parameters' links to the fp32 partitions; without it
        # the interpreter's final garbage collection can abort on those reference cycles
        for name, engine in self.engines.items():
            self._windows.pop(name).__exit__(None, None, None)
            engine.destroy()
        self.engines = {}
