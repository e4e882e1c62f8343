"""Everything distributed, in one place: joining the process group, synchronising the trainable
parameters (plain gradient averaging or DeepSpeed ZeRO), collective checkpoints, rank helpers, gathers.

Only the trainable parameters (LoRA and flow model) are synchronised; the frozen UNet weights, VAE,
text encoder and reward model stay plain modules on every rank.  Two synchronisers share one
interface (:class:`GradientSync`), chosen once by :func:`make_gradient_sync`:

``ddp`` (default) — :class:`DataParallel`: after the last accumulation batch, one all-reduce (mean)
per parameter group, then clipping per group and one optimiser step: DDP's semantics, every rank
holding the whole optimiser state.

``deepspeed`` — :class:`ZeroDataParallel`: one DeepSpeed engine per parameter group (LoRA, flow),
each ZeRO stage 1/2 partitioning its AdamW state (and with ``offload_optimizer`` keeping it and
the fp32 master weights in CPU memory).  The loss is computed outside the engines — the LoRA
weights live inside the frozen UNet and the memory plan calls ``.backward()`` itself, once per
chunk — so the engines' own per-backward reduction cannot be used (ZeRO-2 asserts that a gradient
is reduced once per backward, and its epilogue only runs after ``engine.backward``).  Instead each
update runs inside DeepSpeed's ``coalesce_grad_reduction`` window: the backward passes accumulate
gradients locally, the window's exit reduce-scatters them once (ZeRO-2: each rank keeps its
partition of the averaged gradient), ``engine.step()`` clips and steps each rank's partition and
all-gathers the updated weights into the same parameter objects the UNet and flow model use.
One engine per group keeps the trainer's clipping of each group separately (DeepSpeed's
``gradient_clipping`` clips the global norm of an engine's parameters).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

SHARD_DIR = "shards"  # inside a checkpoint: what each rank writes itself (lowmem_nablagfn.checkpoint)


# ----------------------------------------------------------------------------- process group

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Started by torchrun / ``deepspeed`` / ``accelerate launch`` / srun+torchrun (env RANK, WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_launcher(dcfg) -> None:
    """``accelerate launch`` with a DeepSpeed config only launches (it sets ``ACCELERATE_*`` variables
    for an ``Accelerator`` this trainer does not use); ``distributed.*`` decides.  Refuse a mismatch."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    problems = []
    if dcfg.backend != "deepspeed":
        problems.append("distributed.backend=deepspeed")
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage and stage.isdigit() and int(stage) != dcfg.zero_stage:
        problems.append(f"distributed.zero_stage={stage}")
    offload = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower() not in ("none", "")
    if offload != dcfg.offload_optimizer:
        problems.append(f"distributed.offload_optimizer={str(offload).lower()}")
    if problems:
        raise RuntimeError(f"accelerate's DeepSpeed config and this run's settings disagree; add "
                           f"{' '.join(problems)} to the command (or change the accelerate config)")


def init_process_group(device: torch.device, dcfg) -> None:
    """Join the job's process group once: nccl on CUDA, gloo on CPU, from the launcher's environment.

    Without a launcher a single process trains alone, except with DeepSpeed, which needs a process
    group even for one process: then a local world of one is made (no MPI discovery).
    ``dcfg`` is the ``DistributedConfig``.
    """
    check_launcher(dcfg)
    if not dist.is_available() or dist.is_initialized():
        return
    kind = "nccl" if device.type == "cuda" else "gloo"
    if launched():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(kind, init_method="env://")
    elif dcfg.backend == "deepspeed":
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it
        dist.init_process_group(kind, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------- collectives

def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the ``.grad`` of ``params`` across ranks, flattened into one buffer."""
    if not is_distributed():
        return
    grads: List[Tensor] = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def gather_tensor(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) along dim 0 across ranks."""
    if not is_distributed():
        return x
    out = [torch.zeros_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_objects(items: list) -> list:
    if not is_distributed():
        return list(items)
    out: list = [None] * world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(metrics: Dict[str, float]) -> Dict[str, float]:
    """Average scalar metrics (same keys on every rank) across ranks: one all-reduce."""
    if not is_distributed() or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: float(v) / world_size() for k, v in zip(keys, values)}


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so that all ranks take the same branch)."""
    if not is_distributed():
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


# ----------------------------------------------------------------------------- gradient synchronisers

class GradientSync:
    """How the trainable parameters' gradients become one update; every rank calls every method.

    ``step()`` runs after the last accumulation batch of an update and returns statistics
    (``grad_norm/<group>``); ``state_dict()`` is merged into rank 0's training state;
    ``save_shards(dir)`` writes what every rank must write itself; ``load(state, checkpoint)``
    restores both.
    """

    optimizer: Optional[torch.optim.Optimizer] = None
    sharded = False
    scaler = None  # memory.LossScaler under fp16 (DataParallel only): unscaled before clipping

    def step(self) -> Dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def trainable_groups(self) -> Dict[str, List[nn.Parameter]]:
        raise NotImplementedError

    def nonfinite_gradients(self) -> List[str]:
        """Groups whose accumulated local gradient holds inf or NaN (checked before any reduction)."""
        bad = []
        for name, params in self.trainable_groups().items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                bad.append(f"gradient of {name}")
        if self.scaler is not None and self.scaler.found_inf:
            bad.append("fp16 input gradient (reward or reverse score)")
        return bad

    def skip(self) -> None:
        """Drop the accumulated gradients without an optimiser step (every rank calls it together)."""
        raise NotImplementedError

    def save_shards(self, directory: Path) -> None:
        pass

    def load(self, state: dict, checkpoint: Path) -> None:
        pass

    def close(self) -> None:
        """Release hooks and buffers at the end of training."""


class DataParallel(GradientSync):
    """DDP semantics: per group, average the gradients over ranks, clip, then one optimiser step.

    Works for one process too (averaging is then a no-op), for any optimiser (8-bit included).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float, scaler=None):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler

    def step(self) -> Dict[str, float]:
        stats = {}
        for group in self.optimizer.param_groups:
            average_gradients(group["params"])
            if self.scaler is not None:
                self.scaler.unscale_grads_(group["params"])  # fp32, before clipping
            if self.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(group["params"], self.max_grad_norm)
                stats[f"grad_norm/{group.get('name', 'params')}"] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            stats.update(self.scaler.stepped())
        return stats

    def trainable_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {g.get("name", f"group{i}"): list(g["params"]) for i, g in enumerate(self.optimizer.param_groups)}

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        extra = {"loss_scaler": self.scaler.state_dict()} if self.scaler is not None and self.scaler.enabled else {}
        return {"optimizer": self.optimizer.state_dict(), **extra}

    def load(self, state: dict, checkpoint: Path) -> None:
        if "optimizer" not in state:
            raise RuntimeError(f"checkpoint {checkpoint} keeps its optimiser state in DeepSpeed's partitions: "
                               f"resume it with distributed.backend=deepspeed")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])


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
                           "update lowmem_nablagfn.distributed._without_pickle")


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


def make_gradient_sync(dcfg, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                       micro_batch: int, scaler=None) -> GradientSync:
    """The synchroniser that ``distributed.backend`` names (``DistributedConfig``); ``scaler``: the
    fp16 ``memory.LossScaler`` (ddp only: config validation refuses fp16 with DeepSpeed)."""
    if dcfg.backend == "deepspeed":
        if scaler is not None and scaler.enabled:
            raise ValueError("fp16 loss scaling needs distributed.backend=ddp")
        return ZeroDataParallel(optimizer, dcfg.zero_stage, dcfg.offload_optimizer, max_grad_norm,
                                micro_batch)
    return DataParallel(optimizer, max_grad_norm, scaler)
