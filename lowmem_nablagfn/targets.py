"""What a user-given path points at: ``base``, a run directory, a checkpoint or LoRA directory, or a
LoRA file (:func:`resolve_target`), and reading a LoRA file.  The ``eval`` and ``export`` commands
both start here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checkpoint import LORA_FILE, latest_checkpoint


@dataclass
class Target:
    """What a user-given path points at.

    Attributes:
        lora_file: the LoRA safetensors file, or None for the base model.
        run_dir: the run directory it belongs to, when known.
        config_file: the run's resolved ``config.json``, when found.
        tag: a short name for outputs (``lora``, ``epoch-000011``, ``base``, a file stem).
    """

    lora_file: Optional[Path]
    run_dir: Optional[Path]
    config_file: Optional[Path]
    tag: str


def _find_config(start: Path) -> Optional[Path]:
    """``config.json`` in ``start`` or up to two levels above (run/, run/lora/, run/checkpoints/epoch-N/)."""
    for d in (start, start.parent, start.parent.parent):
        if (d / "config.json").is_file():
            return d / "config.json"
    return None


def resolve_target(target: str) -> Target:
    """Resolve ``base``, a run directory, a checkpoint or LoRA directory, or a LoRA file.

    A run directory gives its final ``lora/`` when the run finished, else its latest checkpoint.
    """
    if target == "base":
        return Target(None, None, None, "base")
    path = Path(target).expanduser()
    if path.is_file():
        config = _find_config(path.parent)
        tag = path.parent.name if path.name == LORA_FILE else path.stem
        return Target(path, config.parent if config else None, config, tag)
    if not path.is_dir():
        raise FileNotFoundError(f"{target}: no such file or directory; give a run directory, a checkpoint "
                                f"directory (runs/NAME/checkpoints/epoch-N), a LoRA directory or file, or 'base'")
    if (path / LORA_FILE).is_file():
        config = _find_config(path)
        return Target(path / LORA_FILE, config.parent if config else None, config, path.name)
    if (path / "config.json").is_file() or (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            done = sorted(p for p in (path / "checkpoints").glob("epoch-*") if (p / LORA_FILE).is_file())
            ckpt = done[-1] if done else None
        lora_dir = path / "lora" if (path / "lora" / LORA_FILE).is_file() else ckpt
        if lora_dir is None:
            raise FileNotFoundError(f"run {path} has no LoRA yet (no lora/{LORA_FILE}, no checkpoint)")
        config = path / "config.json"
        return Target(lora_dir / LORA_FILE, path, config if config.is_file() else None, lora_dir.name)
    raise FileNotFoundError(f"{path} holds neither {LORA_FILE} nor a run (config.json, checkpoints/)")


def load_lora_file(path: Path) -> tuple:
    """(state dict, safetensors metadata) of a LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
