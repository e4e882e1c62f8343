"""Set-up checks: what can be checked without building a model, checked before any model is built.

``train`` and ``profile`` check the run directory, the prompt file, the model (a single file is
identified, a hub id must be cached offline), the LoRA targets against the model's UNet built on the
``meta`` device, the attention backend, the reward's and the backbone's files (the watched rewards' too) and the device;
``plan`` its ``--vram``; ``export`` its destination; ``config`` only validates (printing a
configuration needs no model).  Every problem is one line naming the value, why it cannot work and
the fix; the CLI prints them together and exits 2 (no traceback).  Validation of the values
themselves is :func:`config.validate`.

What the configuration cannot tell fails during set-up (loading the weights, the process group, ...):
:func:`setup_errors` turns it into one :class:`SetupError` line, which the CLI prints, exiting 2.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence


class PreflightError(Exception):
    """One or more problems found before any model was built (``problems``: one line each)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def raise_if(problems: Sequence[str]) -> None:
    if problems:
        raise PreflightError(problems)


class SetupError(Exception):
    """Set-up failed (see :func:`setup_errors`): the message is one line."""


@contextlib.contextmanager
def setup_errors(passthrough: tuple = ()) -> Iterator[None]:
    """Any exception of the enclosed set-up becomes a one-line :class:`SetupError` naming its type
    and the first line of its message (the original is chained as ``__cause__``).  Ctrl-C and the
    ``passthrough`` types (which the caller reports itself) pass."""
    try:
        yield
    except passthrough:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever set-up trips over is reported, not a traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SetupError(f"set-up failed: {type(exc).__name__}: {first or repr(exc)}") from exc


# ----------------------------------------------------------------------------- files and directories

def writable_dir(path: Path, what: str) -> Optional[str]:
    """None when directory ``path`` exists or can be created, and files can be written in it."""
    probe = path
    while not probe.exists() and probe.parent != probe:  # the deepest existing ancestor
        probe = probe.parent
    if not probe.is_dir():
        return f"{what}={path}: {probe} is a file, not a directory; choose another location"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        verb = "written to" if probe == path else f"created ({probe} is not writable)"
        return f"{what}={path} cannot be {verb}: {exc.strerror or exc}; choose a writable location"
    return None


def writable_file(path: Path, what: str) -> Optional[str]:
    """None when file ``path`` can be (re)written."""
    if path.is_dir():
        return f"{what} {path} is a directory; give a file name (e.g. {path / 'lora.safetensors'})"
    problem = writable_dir(path.parent, "directory")
    return None if problem is None else f"{what} {path}: {problem}"


def _looks_local(spec: str) -> bool:
    """A path, not a hub id (``owner/name`` for repos, ``owner/name/file`` for hub files)."""
    return spec.startswith(("/", ".", "~")) or Path(spec).expanduser().exists() or "/" not in spec


def _hub_cached(repo: str, filename: str, revision: Optional[str] = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return isinstance(found, str)


def _offline() -> bool:
    from .rewards.loading import hub_offline

    return hub_offline()


# ----------------------------------------------------------------------------- checks of a config

def check_run_dir(cfg) -> List[str]:
    run_dir = Path(cfg.logging.output_dir).expanduser() / cfg.logging.run_name
    problem = writable_dir(run_dir, "logging.output_dir/logging.run_name")
    return [problem] if problem else []


def check_prompts(cfg) -> List[str]:
    from .rewards.prompts import BUILTIN_SETS, read_prompt_file

    if cfg.prompts.set in BUILTIN_SETS or not Path(cfg.prompts.set).expanduser().is_file():
        return []  # unknown names are validate()'s
    try:
        read_prompt_file(cfg.prompts.set)
    except (ValueError, OSError) as exc:  # empty, unreadable, bad JSON, not UTF-8
        return [f"prompts.set={cfg.prompts.set}: {exc}; give one prompt a line (or a JSON list of strings)"]
    return []


def check_model(cfg) -> List[str]:
    """A single file must be identified (its header only: no weights read); a hub id with
    ``HF_HUB_OFFLINE`` must be in the local hub cache (local directories: validate())."""
    from .config import SINGLE_FILE_SUFFIXES

    model = cfg.pretrained.model
    local = Path(model).expanduser()
    if local.suffix.lower() in SINGLE_FILE_SUFFIXES and local.is_file():
        from .models.single_file import SingleFileError, identify

        try:
            identify(local)
        except SingleFileError as exc:
            return [str(exc)]
        return []
    if model in ("tiny", "sd15-random") or _looks_local(model) or model.count("/") != 1 or not _offline() \
            or Path(model).suffix in (".safetensors", ".ckpt", ".bin", ".pt", ".pth"):  # a single file: validate()
        return []
    if _hub_cached(model, "model_index.json", cfg.pretrained.revision) or \
            _hub_cached(model, "unet/config.json", cfg.pretrained.revision):
        return []
    return [f"pretrained.model={model!r} is not in the local hub cache and HF_HUB_OFFLINE is set; download it "
            f"once online (`hf download {model}`), or point pretrained.model at a local diffusers directory"]


def _reward_defaults(name: str) -> tuple:
    """(default checkpoint hub file or None, default backbone hub id or None) of an external reward."""
    import importlib

    from .rewards import EXTERNAL

    module = importlib.import_module(EXTERNAL[name].split(":")[0])
    checkpoint = backbone = None
    if hasattr(module, "HPS_REPO"):
        checkpoint = f"{module.HPS_REPO}/{module.HPS_FILES.get(name, '')}"
    elif hasattr(module, "IR_REPO"):
        checkpoint = f"{module.IR_REPO}/{module.IR_FILE}"
    backbone = getattr(module, "DEFAULT_BACKBONE", None) or getattr(module, "DEFAULT_TOKENIZER", None)
    return checkpoint, backbone


def check_reward_files(cfg) -> List[str]:
    """The reward's checkpoint and backbone (a mixture: each component's): local ones must exist, hub
    ones (offline) be cached."""
    from .rewards.mixture import MIX, components

    if cfg.reward.name != MIX:
        return _reward_files(cfg.reward, "reward.checkpoint", "reward.backbone")
    return [problem for name, _, sub in components(cfg.reward)
            for problem in _reward_files(sub, f"reward.checkpoints.{name}", f"reward.backbones.{name}")]


def _reward_files(r, checkpoint_key: str, backbone_key: str) -> List[str]:
    """:func:`check_reward_files` of one reward ``r`` (a RewardConfig); the messages name the two keys given."""
    from .rewards import EXTERNAL
    from .rewards.loading import random_size

    if r.name not in EXTERNAL or random_size(r.checkpoint):
        return []
    default_ckpt, default_backbone = _reward_defaults(r.name)
    problems = []
    spec = r.checkpoint or default_ckpt
    if spec:
        if _looks_local(spec) or spec.count("/") < 2:
            if not Path(spec).expanduser().is_file():
                problems.append(f"{checkpoint_key}={spec}: no such file; give the local path of the "
                                f"{r.name} weights (see the README's reward table)")
        elif _offline():
            repo, filename = "/".join(spec.split("/")[:2]), "/".join(spec.split("/")[2:])
            if not _hub_cached(repo, filename):
                problems.append(f"{checkpoint_key}={spec} (hub repo {repo}, file {filename}) is not in the local "
                                f"hub cache and HF_HUB_OFFLINE is set; download it once, or give a local file")
    spec = r.backbone or default_backbone
    if spec:
        if _looks_local(spec) or spec.count("/") > 1:
            if not Path(spec).expanduser().is_dir():
                problems.append(f"{backbone_key}={spec}: no such directory; give a local copy of the "
                                f"backbone ({default_backbone or 'see the README'})")
        elif _offline() and not _hub_cached(spec, "config.json") and not _hub_cached(spec, "vocab.txt"):
            problems.append(f"{backbone_key}={spec} is not in the local hub cache and HF_HUB_OFFLINE is set; "
                            f"`hf download {spec} --local-dir DIR` once and pass {backbone_key}=DIR")
    return problems


def check_monitor_files(cfg) -> List[str]:
    """The watched rewards' checkpoints and backbones (``monitor.*``), as :func:`check_reward_files` checks the
    trained reward's (each message names the ``monitor.`` option to set)."""
    from types import SimpleNamespace

    from .monitor import reward_config

    problems = []
    for name in cfg.monitor.rewards:
        for p in check_reward_files(SimpleNamespace(reward=reward_config(cfg, name))):
            p = p.replace("reward.checkpoint=", f"monitor.checkpoints.{name}=")
            problems.append(f"monitor.rewards {name}: " + p.replace("reward.backbone=", f"monitor.backbones.{name}="))
    return problems


def check_attention(cfg) -> List[str]:
    """``memory.attention`` can run on the device (xformers: installed, and CUDA)."""
    from .distributed import pick_device
    from .models.attention import check_attention_backend

    try:
        device = pick_device(cfg.device)
    except RuntimeError:  # device=cuda without a CUDA device: check_device says so
        return []
    try:
        check_attention_backend(cfg.memory.attention, device)
    except (ImportError, ValueError) as exc:
        return [str(exc)]
    return []


def check_lora_targets(cfg) -> List[str]:
    """``model.lora.target_modules`` name modules of the model's UNet, built from its config on the
    ``meta`` device (no weights read); skipped when the config cannot be had offline (check_model)."""
    import torch

    from .models import unet_config_of
    from .models.lora import target_problem
    from .models.single_file import SingleFileError

    try:
        config = unet_config_of(cfg.pretrained.model)
    except (SingleFileError, OSError, ValueError):  # reported by check_model / validate
        return []
    if config is None:
        return []
    from diffusers import UNet2DConditionModel

    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except Exception:  # noqa: BLE001 - a config diffusers cannot build: loading the model says why
        return []
    problem = target_problem(unet, list(cfg.model.lora.target_modules))
    return [problem] if problem else []


def check_device(cfg) -> List[str]:
    import torch

    if cfg.device != "cuda":
        return []
    if not torch.cuda.is_available():
        return ["device=cuda but no CUDA device is visible (torch.cuda.is_available() is False); "
                "use device=auto or device=cpu, or check CUDA_VISIBLE_DEVICES and the driver"]
    local = int(os.environ.get("LOCAL_RANK", 0))
    if local >= torch.cuda.device_count():
        return [f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                f"start at most that many processes per node"]
    return []


def check_config(cfg) -> List[str]:
    """Every check of a configuration that is run (``train``, ``profile``)."""
    problems: List[str] = []
    for check in (check_run_dir, check_prompts, check_model, check_lora_targets, check_attention, check_reward_files,
                  check_monitor_files, check_device):
        problems += check(cfg)
    return problems


# ----------------------------------------------------------------------------- other commands

def check_vram(text: Optional[str]) -> List[str]:
    if text is None:
        return []
    from .planner import parse_vram

    try:
        value = parse_vram(text)
    except ValueError as exc:
        return [f"plan --vram: {exc}"]
    return [] if value > 0 else [f"plan --vram {text}: a card needs more than 0 GiB"]


def check_export(out: str) -> List[str]:
    problem = writable_file(Path(out).expanduser(), "export --out")
    return [problem] if problem else []
