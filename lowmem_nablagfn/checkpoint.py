"""Checkpoints: LoRA in diffusers format, flow model, optimiser and RNG state, the lagged sample buffer.

Every checkpoint is written into a temporary directory beside its final place and renamed when
complete, and ``latest`` (a one-line file) is replaced atomically, so an interrupted write never
leaves a checkpoint that looks whole. ``--resume`` continues from ``latest``.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "training_state.pt"


def lora_state_dict(unet: nn.Module) -> dict:
    """The adapter's weights in diffusers' naming (what ``load_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet: nn.Module, directory: str | Path) -> None:
    from diffusers import StableDiffusionPipeline

    state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=state, safe_serialization=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, epoch: int, unet: nn.Module, flow_model: Optional[nn.Module],
                    training_state: dict, keep: int = 2, extra_writer=None) -> Path:
    """Write ``run_dir/checkpoints/epoch-XXXXXX`` atomically and point ``latest`` at it.

    ``training_state`` holds the optimiser state, counters, the sample buffer, etc. (torch.save-able).
    ``extra_writer(tmp_dir)`` may add files (e.g. DeepSpeed's own state) before the rename.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-epoch-{epoch:06d}-"))
    try:
        save_lora(unet, tmp)
        if flow_model is not None:
            flow_model.save_pretrained(str(tmp / "flow_model"), safe_serialization=True)
        torch.save({**training_state, "epoch": epoch, "rng": rng_state()}, tmp / STATE_FILE)
        if extra_writer is not None:
            extra_writer(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("epoch-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    marker = run_dir / "checkpoints" / "latest"
    if not marker.is_file():
        return None
    path = run_dir / "checkpoints" / marker.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def resolve_resume(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """``resume`` = ``"auto"`` (latest of the run, if any), a checkpoint directory, or None."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume).expanduser()
    if (path / "checkpoints").is_dir():
        path = latest_checkpoint(path) or path
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: no {STATE_FILE} there; give a checkpoint directory "
                                f"(runs/NAME/checkpoints/epoch-N), a run directory, or 'auto'")
    return path


def load_lora_into(unet: nn.Module, directory: Path) -> None:
    """Load a diffusers-format LoRA file into the UNet's existing adapter (for resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(directory / LORA_FILE))
    state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    incompatible = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state))
    missing = [k for k in getattr(incompatible, "missing_keys", []) if "lora_" in k]
    if missing:
        raise RuntimeError(f"checkpoint {directory} lacks LoRA weights: {missing[:3]} …")


def load_training_state(directory: Path) -> dict:
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
