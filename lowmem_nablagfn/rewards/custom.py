"""Your own reward: ``reward.name=path/to/my_reward.py:build`` or ``reward.name=my_package.rewards:build``.

The contract (docs/rewards-custom.md): ``build()`` takes no arguments and returns a ``torch.nn.Module``
whose ``forward(images, prompts)`` maps images (B, 3, H, W) float32 in [0, 1] and a list of B prompt
strings to (B,) scores, differentiable with respect to the images.  The score is the log-reward up to
``model.reward_scale`` (β), exactly as the packaged rewards.

Loading: the file is executed with :mod:`importlib` (a module path is imported); nothing is
unpickled.  :class:`CustomReward` wraps the user's module into a
:class:`~lowmem_nablagfn.rewards.base.RewardModel`: the base class checks the inputs and runs the
score in fp32 outside autocast; the wrapper checks the output's shape on every call.  A module with
its own ``set_checkpointing(on)`` gets ``memory.checkpoint_reward`` passed on
(:class:`CheckpointedCustomReward`); ``reward.weight_dtype``, ``reward.antialias`` and
``reward.checkpoint`` / ``reward.backbone`` belong to the packaged rewards and are refused by validation.

:func:`check` builds the reward and tries it on one random image (shape, finite, a non-zero gradient
reaching the image), returning each problem as one line; validation calls it, so a bad reward stops
the CLI with exit code 2 before any model is built.  ``build()`` therefore runs twice in a training
process (the check and the run); the check's verdict is cached per file version.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .base import RewardModel

DOC = "docs/rewards-custom.md"
CHECK_PROMPT = "a photo of a cat"
_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class CustomRewardError(ValueError):
    """A user reward cannot be loaded or breaks the contract; the message is one line."""


def split_name(name: str) -> Optional[Tuple[str, str]]:
    """(file or module, function) of a custom reward name, None for any other name.

    ``path/to/file.py:build`` (a ``.py`` file) or ``package.module:build`` (a dotted module path);
    ``builtin:*`` names are the built-in rewards."""
    if not isinstance(name, str) or ":" not in name or name.startswith("builtin:"):
        return None
    target, _, fn = name.rpartition(":")
    if not fn.isidentifier() or not (target.endswith(".py") or _MODULE_PATH.match(target)):
        return None
    return target, fn


def is_custom(name: str) -> bool:
    return split_name(name) is not None


def _one_line(exc: BaseException, path: Optional[Path] = None) -> str:
    """``Type: message`` on one line, with the line of ``path`` where it was raised when known."""
    text = " ".join(str(exc).split()) or "(no message)"
    where = ""
    if path is not None:
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
        if isinstance(exc, SyntaxError) and exc.lineno is not None:
            lines = [exc.lineno]
        where = f" ({path.name} line {lines[-1]})" if lines and not isinstance(exc, SyntaxError) else ""
    return f"{type(exc).__name__}: {text}{where}"


def load_function(name: str) -> Callable[[], nn.Module]:
    """The user's build function named by ``name``, imported fresh (a file is executed, not unpickled).

    Raises:
        CustomRewardError: no such file / module, an error while importing it, no such function.
    """
    target, fn = split_name(name) or (None, None)
    if target is None:
        raise CustomRewardError(f"reward.name={name!r} is not a custom reward (path/to/file.py:build or "
                                f"package.module:build)")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise CustomRewardError(f"reward.name={name!r}: no such file {path}; give the path of the Python file "
                                    f"that defines {fn}() (see {DOC})")
        module_name = "lowmem_nablagfn_user_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and typing look the module up while it runs
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any error in the user's file is reported, on one line
            sys.modules.pop(module_name, None)
            raise CustomRewardError(f"reward.name={name!r}: running {path} failed: {_one_line(exc, path)}") from exc
        where = str(path)
    else:
        try:
            importlib.invalidate_caches()
            module = importlib.import_module(target)
        except Exception as exc:  # noqa: BLE001 - ModuleNotFoundError or an error inside the module
            raise CustomRewardError(f"reward.name={name!r}: cannot import module {target} ({_one_line(exc)}); "
                                    f"is its package installed or on PYTHONPATH?") from exc
        where = f"module {target}"
    build = getattr(module, fn, None)
    if not callable(build):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise CustomRewardError(f"reward.name={name!r}: {where} defines no function {fn!r} (it defines: "
                                f"{', '.join(defined) or 'nothing callable'}); name the function after the colon")
    return build


class CustomReward(RewardModel):
    """A user's module as a :class:`RewardModel`: ``score`` calls it and checks the output's shape.

    Attributes:
        module: the user's module (a submodule: ``.to()``, ``.eval()`` and ``requires_grad_`` reach it).
        name: ``reward.name``, for error messages.
    """

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.module = module
        self.name = name
        self.prompt_free = bool(getattr(module, "prompt_free", False))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        out = self.module(images, prompts)
        n = images.shape[0]
        if not isinstance(out, Tensor) or tuple(out.shape) != (n,):
            what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
            raise CustomRewardError(f"reward.name={self.name!r}: forward(images, prompts) returned {what} for {n} "
                                    f"image{'s' if n != 1 else ''}; return one score per image, shape (B,)")
        return out


class CheckpointedCustomReward(CustomReward):
    """A user's module that has its own ``set_checkpointing(on)`` (``memory.checkpoint_reward``)."""

    def set_checkpointing(self, enabled: bool = True) -> "CheckpointedCustomReward":
        self.module.set_checkpointing(bool(enabled))
        return self


def build(cfg) -> CustomReward:
    """The wrapped user reward of a :class:`~lowmem_nablagfn.config.RewardConfig` (``cfg.name`` only).

    Raises:
        CustomRewardError: the function cannot be found, raises, or returns no ``nn.Module``.
    """
    fn = load_function(cfg.name)
    try:
        module = fn()
    except Exception as exc:  # noqa: BLE001 - reported on one line, with the user's line number
        path = Path(fn.__code__.co_filename) if hasattr(fn, "__code__") else None
        raise CustomRewardError(f"reward.name={cfg.name!r}: {fn.__name__}() raised {_one_line(exc, path)}") from exc
    if not isinstance(module, nn.Module):
        kind = "function" if callable(module) and not isinstance(module, type) else type(module).__name__
        raise CustomRewardError(f"reward.name={cfg.name!r}: {fn.__name__}() returned a {kind}, not a "
                                f"torch.nn.Module; wrap the score in a module whose forward(images, prompts) "
                                f"returns (B,) scores (see {DOC})")
    wrapper = CheckpointedCustomReward if callable(getattr(module, "set_checkpointing", None)) else CustomReward
    return wrapper(module, cfg.name)


def check(cfg, resolution: int = 64) -> List[str]:
    """Problems of the custom reward ``cfg.name`` (a RewardConfig), each one line; [] when it is usable.

    Builds it and scores one random ``resolution`` px image on the CPU: the output must be (1,),
    finite, and its gradient with respect to the image must exist and be non-zero somewhere.
    """
    target, _ = split_name(cfg.name)
    stamp = None
    if target.endswith(".py") and Path(target).expanduser().is_file():
        st = Path(target).expanduser().stat()
        stamp = (st.st_mtime_ns, st.st_size)
    return list(_check(cfg.name, int(resolution), stamp))


@functools.lru_cache(maxsize=32)
def _check(name: str, resolution: int, stamp) -> Tuple[str, ...]:
    """:func:`check`, cached per (name, resolution, file version): validation runs more than once."""
    from types import SimpleNamespace

    try:
        reward = build(SimpleNamespace(name=name)).eval().requires_grad_(False)  # as build_reward leaves it
    except CustomRewardError as exc:
        return (str(exc),)
    head = f"reward.name={name!r}:"
    x = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0), requires_grad=True)
    try:
        score = reward(x, [CHECK_PROMPT])
    except CustomRewardError as exc:
        return (str(exc),)
    except Exception as exc:  # noqa: BLE001 - the user's forward failed: one line
        return (f"{head} forward(images, prompts) raised {_one_line(exc)} on one random {resolution} px image "
                f"(images (1, 3, {resolution}, {resolution}) float32 in [0, 1], prompts [{CHECK_PROMPT!r}])",)
    if not torch.isfinite(score).all():
        return (f"{head} a non-finite score ({score.item()}) for a random {resolution} px image; the score must be "
                f"finite for any image in [0, 1]",)
    grad = None
    if score.requires_grad:
        (grad,) = torch.autograd.grad(score.sum(), x, allow_unused=True)
    if grad is None:
        return (f"{head} no gradient reaches the image (the score has no autograd graph back to it: detached, "
                f"computed under torch.no_grad(), or through .item(), numpy or integer ops); the trainer needs "
                f"d score / d image",)
    if not torch.isfinite(grad).all():
        return (f"{head} the gradient with respect to the image is not finite for a random {resolution} px image",)
    if not grad.abs().sum() > 0:
        return (f"{head} the gradient with respect to the image is zero everywhere for a random {resolution} px "
                f"image (a constant, clamped or thresholded score?); the trainer follows this gradient",)
    return ()


__all__ = ["CheckpointedCustomReward", "CustomReward", "CustomRewardError", "build", "check", "is_custom",
           "load_function", "split_name"]
