"""What a checkpoint holds besides the weights, and the names of its files: :class:`TrainingState`
(optimiser, counters, the lagged sample buffer, RNG states, config), the errors of the package, and
the finiteness check that guards every write."""
from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Dict, Optional

import numpy as np
import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "training_state.pt"
MANIFEST = "manifest.json"
FLOW_DIR = "flow_model"
FLOW_FILE = "diffusion_pytorch_model.safetensors"
RANK_FILE = "rank-{:05d}.pt"
DAMAGED_DIR = "damaged"
ABANDONED_DIR = "abandoned"
FORMAT = 1


class RunError(Exception):
    """A run cannot start or resume as asked (nothing was written); the message says what to do."""


class NonFiniteError(RuntimeError):
    """Non-finite values where weights or updates must be finite; the message names the likely causes."""


LIKELY_CAUSES = ("Likely causes: training.learning_rate / training.flow_learning_rate too high, "
                 "model.reward_scale too large for the reward's range, fp16 overflow "
                 "(training.mixed_precision=bf16 or no), or a reward that returns NaN/inf. "
                 "The checkpoints written so far hold finite weights: lower the value and continue with --resume.")


def check_finite(tensors: Dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensors of ``tensors`` holding inf or NaN."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"{what} holds non-finite values ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}); "
                             f"not written. {LIKELY_CAUSES}")


def rng_state() -> dict:
    """Python, NumPy, torch and (with CUDA) this process's GPU generator states as tensors and plain
    values.  Only the current device's CUDA state: a job resumed with other visible GPUs (a SLURM task
    that sees one GPU resuming a torchrun rank that saw eight) restores it on the device it uses."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": list(internal), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Set what :func:`rng_state` saved; a CUDA state applies to this process's current device.

    Checkpoints of versions before issue 23 hold every visible GPU's state (a list): the entry of the
    current device when the list has one (the same launch as when saved), else the first (a torchrun
    rank's own state sat at its LOCAL_RANK, which a job with fewer visible GPUs cannot tell)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):
            here = torch.cuda.current_device()
            cuda = cuda[here] if here < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


def buffer_state(traj) -> Optional[dict]:
    """A :class:`~lowmem_nablagfn.sampling.Trajectories` as tensors, strings and dicts (CPU)."""
    if traj is None:
        return None
    from ..sampling import Trajectories

    out = {}
    for f in fields(Trajectories):
        v = getattr(traj, f.name)
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
        elif v is not None and not isinstance(v, list):  # a Conditioning (SDXL): its tensors
            v = {"conditioning": {g.name: None if getattr(v, g.name) is None else getattr(v, g.name).cpu()
                                  for g in fields(v)}}
        out[f.name] = v
    return out


def buffer_from_state(state: Optional[dict], device=None):
    """The :class:`~lowmem_nablagfn.sampling.Trajectories` of :func:`buffer_state`, on ``device`` (None:
    where they were loaded, host memory; the trainer then places them with the memory plan's ``park``)."""
    if state is None:
        return None
    from .. import sampling

    state = dict(state)
    for k, v in state.items():
        if isinstance(v, dict) and "conditioning" in v:
            state[k] = sampling.Conditioning(**v["conditioning"])
    traj = sampling.Trajectories(**state)
    return traj if device is None else traj.to(device)


@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs to continue bit for bit.

    Attributes:
        epoch: the last completed epoch (the resumed run starts at ``epoch + 1``).
        global_step: optimiser updates so far.
        config: the resolved configuration (``config.to_dict``).
        sync: the gradient synchroniser's state (``GradientSync.state_dict()``: the optimiser under
            ddp; empty under DeepSpeed, whose partitions are files of their own).
        buffer: this rank's lagged samples (:func:`buffer_state`), or None.
        rng: this rank's generator states (:func:`rng_state`).
        world_size: processes that wrote it (each rank's buffer and partitions are its own).
    """

    epoch: int
    global_step: int
    config: dict
    sync: dict = field(default_factory=dict)
    buffer: Optional[dict] = None
    rng: dict = field(default_factory=rng_state)
    world_size: int = 1

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
