"""Finding and reading reward-model weights: local paths, hub files, random weights, clear errors.

``reward.checkpoint`` / ``reward.backbone`` accept:

* a local path (file or folder);
* a hub file ``owner/repo/path/in/repo`` (``reward.checkpoint``) or a hub repo id ``owner/repo``
  (``reward.backbone``), downloaded with ``huggingface_hub`` only when online; with
  ``HF_HUB_OFFLINE=1`` only the local hub cache is searched, and a miss is an error, never a wait;
* ``random`` (full-size architecture, random weights: profiling without the files) or
  ``random:reduced`` (a reduced configuration of the same classes: tests and tiny CPU runs).
  ``random`` is the only hook for weight-free models; ``build(cfg, size="reduced")`` loads a file
  saved from a reduced model through the real loading path (tests).

A missing file raises :class:`MissingCheckpointError`, whose message says where to get it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import torch

RANDOM_SIZES = {"random": "full", "random:full": "full", "random:reduced": "reduced"}
SIZES = ("full", "reduced")


class MissingCheckpointError(FileNotFoundError):
    """A reward checkpoint or backbone is missing; the message says how to obtain it."""


def random_size(spec: Optional[str]) -> Optional[str]:
    """``full`` / ``reduced`` for a ``random[:size]`` spec, None for anything else."""
    return RANDOM_SIZES.get(spec) if isinstance(spec, str) else None


def arch_size(spec: Optional[str], size: Optional[str]) -> str:
    """The architecture to build: ``size`` if given, else from a ``random:...`` spec, else full."""
    size = size or random_size(spec) or "full"
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return size


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a transformers dependency
        return True
    return bool(constants.HF_HUB_OFFLINE)


def resolve_file(spec: Optional[str], default: Optional[str], how: str) -> Path:
    """A local file for ``spec`` (path or ``owner/repo/file`` on the hub; None -> ``default``).

    Args:
        spec: what the user gave (``reward.checkpoint``).
        default: hub file used when ``spec`` is None (None: no default, the user must give one).
        how: how to obtain the file, appended to every error.
    """
    spec = spec if spec is not None else default
    if spec is None:
        raise MissingCheckpointError(f"no checkpoint given. {how}")
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = spec.strip("/").split("/")
    if path.exists() or path.is_absolute() or spec.startswith(".") or len(parts) < 3:
        raise MissingCheckpointError(f"checkpoint {spec!r} is not a file. {how}")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, local_files_only=hub_offline()))
    except Exception as exc:  # hub errors are many (offline miss, network, 404): all mean "missing"
        where = ("is not in the local hub cache (HF_HUB_OFFLINE is set)" if hub_offline()
                 else f"could not be downloaded ({exc.__class__.__name__})")
        raise MissingCheckpointError(f"checkpoint {spec!r} (hub repo {repo_id}, file {filename}) {where}. {how}") \
            from exc


def resolve_folder(spec: str, patterns: Sequence[str], required: Sequence[str], how: str) -> Path:
    """A local folder for ``spec`` (a folder, or a hub repo id fetched with ``patterns`` only).

    The folder must hold one of the files ``required``.  Hub repos are resolved here rather than by
    ``from_pretrained``, because transformers 5 offline can silently return a placeholder (a
    5-token BertTokenizer for an uncached ``bert-base-uncased``).
    """
    path = Path(spec).expanduser()
    if not path.is_dir():
        if path.exists() or path.is_absolute() or spec.startswith(".") or spec.count("/") > 1:
            raise MissingCheckpointError(f"backbone {spec!r} is not a folder. {how}")
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec, allow_patterns=list(patterns), local_files_only=hub_offline()))
        except Exception as exc:  # offline miss, network, unknown repo: all mean "missing"
            where = "is not a local folder and not in the local hub cache (HF_HUB_OFFLINE is set)" if hub_offline() \
                else f"could not be downloaded ({exc.__class__.__name__})"
            raise MissingCheckpointError(f"backbone {spec!r} {where}. {how}") from exc
    if not any((path / name).is_file() for name in required):
        raise MissingCheckpointError(f"backbone {spec!r} ({path}) has no {' or '.join(required)}. {how}")
    return path


def load_state_dict(path: Path, key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.pt`` / ``.pth`` / ``.safetensors`` file, on CPU, without executing pickled code.

    ``key``: take ``file[key]`` when present (HPS files are ``{'state_dict': ...}``); a ``module.``
    prefix (DataParallel) is stripped.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None and isinstance(state, dict) and key in state:
        state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_exact(module: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error naming the missing / unexpected keys."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source} does not match {type(module).__name__}: "
                         f"missing {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
                         f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}")


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Deterministic random initialisation that leaves the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


__all__ = ["MissingCheckpointError", "arch_size", "hub_offline", "load_exact", "load_state_dict",
           "random_size", "resolve_file", "resolve_folder", "seeded"]
