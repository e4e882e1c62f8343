"""The process group and this process's place in it: joining the job, the device, rank helpers.

Every helper answers for a single process too (rank 0 of a world of one), so callers never test
whether they run distributed.
"""
from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Started by torchrun / ``deepspeed`` / ``accelerate launch`` / srun+torchrun (env RANK, WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(device: str = "auto") -> torch.device:
    """The torch device of the ``device`` setting (``auto`` | ``cpu`` | ``cuda``): this rank's GPU
    (``LOCAL_RANK``) when CUDA is asked for or, with ``auto``, visible; else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


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


# The backend string of the group joined on each device type.  NCCL serves CUDA tensors only: a
# collective on a CPU tensor (the epoch's metrics, a vote, a pickled object) would raise "No backend
# type associated with device type cpu", so a CUDA job's group also has gloo for the CPU (PyTorch's own
# default device map); tensors on the GPU (gradients, rewards) still go through NCCL.
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def init_process_group(device: torch.device, dcfg) -> None:
    """Join the job's process group once (:data:`BACKENDS`: NCCL and gloo on CUDA, gloo on the CPU)
    from the launcher's environment.

    Without a launcher a single process trains alone, except with DeepSpeed, which needs a process
    group even for one process: then a local world of one is made (no MPI discovery).
    ``dcfg`` is the ``DistributedConfig``.
    """
    check_launcher(dcfg)
    if not dist.is_available() or dist.is_initialized():
        return
    if not (launched() or dcfg.backend == "deepspeed"):
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives and barriers run on the current device
    if launched():
        dist.init_process_group(BACKENDS[device.type], init_method="env://")
    else:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it
        dist.init_process_group(BACKENDS[device.type], init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)


def collective_device(like: Optional[torch.Tensor] = None) -> torch.device:
    """The device a collective's tensors go on in the job's process group: the one place that decides.

    ``like``'s own device when the group has a backend for its type (no copy: gradients and rewards
    on the GPU go to NCCL where they lie); else the CPU when the group has a CPU backend (the groups
    :func:`init_process_group` makes); else this rank's GPU (a group of NCCL alone, made before this
    package's: NCCL has no CPU backend).  Callers copy there and back.
    """
    entries = dist.get_backend_config().split(",")
    types = {e.split(":")[0] for e in entries if ":" in e}
    if like is not None and like.device.type in types:
        return like.device
    if "cpu" in types:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


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
        device = collective_device()
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
