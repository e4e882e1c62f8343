"""Saving and loading a checkpoint (collective: every rank calls them): the LoRA in diffusers format,
the flow model, the training state, each rank's shard, DeepSpeed's partitions through ``sync``."""
from __future__ import annotations

import os
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import distributed as dist
from ..distributed import SHARD_DIR
from .files import (atomic_write_text, checkpoints, epoch_of, fsync_dir, fsync_tree, make_temp_dir, usual_modes,
                    write_manifest)
from .state import (FLOW_DIR, FLOW_FILE, LORA_FILE, RANK_FILE, STATE_FILE, RunError, TrainingState,
                    check_finite, set_rng_state)

def lora_state_dict(denoiser: nn.Module) -> dict:
    """The adapter's weights as its family's diffusers LoRA file names them (without the ``unet.`` /
    ``transformer.`` prefix; :meth:`~lowmem_nablagfn.models.family.UNetFamily.lora_state`)."""
    from ..models import family_of

    return family_of(denoiser).lora_state(denoiser)


def save_lora(denoiser: nn.Module, directory: str | Path) -> None:
    """The LoRA in its family's diffusers format (``pytorch_lora_weights.safetensors``: what
    ``load_lora_weights`` of the model's pipeline reads); refuses non-finite weights."""
    from ..models import family_of

    state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(denoiser).items()}
    check_finite(state, "the LoRA")
    family_of(denoiser).write_lora(state, directory)
    usual_modes(Path(directory))


def load_lora_into(denoiser: nn.Module, directory: Path) -> None:
    """Load a diffusers-format LoRA file into the denoiser's existing adapter (for resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..models import family_of

    prefix = family_of(denoiser).lora_prefix + "."
    state = load_file(str(directory / LORA_FILE))
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:  # (peft names, SD 3's, pass through the conversion unchanged)
        incompatible = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(state))
    except RuntimeError as exc:  # a shape mismatch lists every tensor: keep the first line
        raise RunError(f"checkpoint {directory}: its LoRA does not fit this model "
                       f"({str(exc).splitlines()[-1].strip()}); resume with the run's model.lora settings") from None
    missing = [k for k in getattr(incompatible, "missing_keys", []) if "lora_" in k]
    if missing:
        raise RunError(f"checkpoint {directory} lacks LoRA weights: {missing[:3]} …")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def save(run_dir: Path, denoiser: nn.Module, flow_model: Optional[nn.Module], state: TrainingState, sync,
         keep: int = 2) -> Path:
    """Write ``RUN/checkpoints/epoch-XXXXXX`` atomically and point ``latest`` at it.

    Collective: every rank calls it at the same epoch (decided from the epoch number).  Rank 0 makes
    the temporary directory; every rank writes its own part (its sample buffer and RNG state when
    several, its ZeRO partitions); after a barrier rank 0 writes the LoRA, the flow model, the
    training state and the manifest, flushes every file and directory of it to disk (the other ranks'
    files too), renames it, flushes the rename, points ``latest`` at it and only then prunes to the
    newest ``keep`` (a power loss at any point leaves an intact checkpoint).  The run directory must
    be on a file system every node sees.  Non-finite weights are refused (on every rank, before
    anything is written).
    """
    check_finite({f"lora.{k}": v for k, v in lora_state_dict(denoiser).items()}, "the LoRA")
    if flow_model is not None:
        check_finite({f"flow_model.{k}": v for k, v in flow_model.state_dict().items()}, "the flow model")
    root = run_dir / "checkpoints"
    tmp = None
    if dist.is_main():
        if not root.is_dir():
            root.mkdir(parents=True)
            fsync_dir(root.parent)
        tmp = str(make_temp_dir(root, f".tmp-epoch-{state.epoch:06d}-"))
    tmp = Path(dist.broadcast_object(tmp))
    final = root / f"epoch-{state.epoch:06d}"
    try:
        if state.world_size > 1:
            (tmp / SHARD_DIR).mkdir(exist_ok=True)
            torch.save({"buffer": state.buffer, "rng": state.rng}, tmp / SHARD_DIR / RANK_FILE.format(dist.rank()))
        sync.save_shards(tmp / SHARD_DIR)
        dist.barrier()
        if dist.is_main():
            save_lora(denoiser, tmp)
            if flow_model is not None:
                flow_model.save_pretrained(str(tmp / FLOW_DIR), safe_serialization=True)
            main = state.as_dict()
            if state.world_size > 1:  # the buffer and RNG state are in each rank's shard
                main.update(buffer=None, rng={})
            torch.save(main, tmp / STATE_FILE)
            usual_modes(tmp)
            write_manifest(tmp, state)
            fsync_tree(tmp)  # the contents durable before the name that publishes them
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(root)  # the rename durable before any older checkpoint's deletion can be
            atomic_write_text(root / "latest", final.name + "\n")
            prune(root, keep, final)
    except BaseException:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return final


def prune(root: Path, keep: int, written: Path) -> None:
    """Delete the checkpoints of ``root`` older than ``written`` (the one just saved) beyond the newest
    ``keep``, ``written`` included; ``keep`` <= 0 keeps all.  Never ``written`` nor anything newer: those
    belong to another branch of the run (a resume from an older checkpoint sets them aside first)."""
    if keep <= 0:
        return
    older = [p for p in checkpoints(root.parent) if epoch_of(p) < epoch_of(written)]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load(checkpoint: Path, denoiser: nn.Module, flow_model: Optional[nn.Module], sync) -> TrainingState:
    """Every rank: LoRA, flow model, optimiser (through ``sync``: ZeRO reads this rank's partitions),
    this rank's sample buffer and RNG state (which is set).  ``checkpoint`` was verified by
    :func:`decide_start`."""
    from safetensors.torch import load_file

    raw = _load(checkpoint / STATE_FILE)
    state = TrainingState(**{f.name: raw[f.name] for f in fields(TrainingState) if f.name in raw})
    if state.world_size > 1:
        own = _load(checkpoint / SHARD_DIR / RANK_FILE.format(dist.rank()))
        state.buffer, state.rng = own["buffer"], own["rng"]
    load_lora_into(denoiser, checkpoint)
    if flow_model is not None:
        weights = load_file(str(checkpoint / FLOW_DIR / FLOW_FILE))
        try:
            flow_model.load_state_dict(weights)
        except RuntimeError as exc:
            raise RunError(f"checkpoint {checkpoint}: its flow model does not fit this one "
                           f"({str(exc).splitlines()[-1].strip()}); resume with the run's "
                           f"model.flow_block_widths") from None
    sync.load(state.sync, checkpoint)
    set_rng_state(state.rng)
    return state
