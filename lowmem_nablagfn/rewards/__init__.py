"""Rewards: the interface, the built-in rewards, the registry of reward models and prompt sets.

Reward models proper (aesthetic, HPSv2, ImageReward, PickScore, CLIPScore) live in their own modules
and are imported lazily, so their heavy dependencies (the ``rewards`` extra) are needed only when used.
A user's own reward is named ``path/to/file.py:build`` or ``package.module:build`` (:mod:`.custom`);
a weighted sum of rewards is ``mix`` (:mod:`.mixture`).
"""
from __future__ import annotations

import dataclasses
import importlib

import torch

from ..dtypes import STORAGE_DTYPES, to_dtype
from . import mixture
from .base import RewardModel
from .builtin import BUILTIN
from .custom import is_custom
from .loading import random_size
from .mixture import MIX, MixtureReward

#: name -> "module:function" building the reward from a RewardConfig and a device.
EXTERNAL = {
    "aesthetic": "lowmem_nablagfn.rewards.aesthetic:build",
    "hpsv2": "lowmem_nablagfn.rewards.hpsv2:build",
    "hpsv2.1": "lowmem_nablagfn.rewards.hpsv2:build",
    "imagereward": "lowmem_nablagfn.rewards.imagereward:build",
    "pickscore": "lowmem_nablagfn.rewards.pickscore:build",
    "clipscore": "lowmem_nablagfn.rewards.clipscore:build",
}


def known_reward(name: str) -> bool:
    """A built-in or packaged reward, or a custom one's name (whether it loads: ``custom.check``)."""
    return name in BUILTIN or name in EXTERNAL or is_custom(name)


def reward_names() -> list:
    return sorted(BUILTIN) + sorted(EXTERNAL)


def apply_preprocessing_options(model: RewardModel, cfg) -> RewardModel:
    """``reward.antialias`` / ``reward.max_length`` over the reward's own official preprocessing
    (each reward model's default transform and token length; None keeps them)."""
    if getattr(cfg, "antialias", None) is not None:
        model.transform = dataclasses.replace(model.transform, antialias=bool(cfg.antialias))
    if getattr(cfg, "max_length", None) is not None:
        model.max_length = int(cfg.max_length)  # ImageReward (validation refuses it elsewhere)
    return model


def build_reward(cfg, device: torch.device | str = "cpu") -> RewardModel:
    """Build the reward named by ``cfg.name`` (a :class:`~lowmem_nablagfn.config.RewardConfig`); ``mix``:
    the weighted sum of ``cfg.mix``'s rewards, each built here (:mod:`.mixture`)."""
    if cfg.name == MIX:
        model = mixture.build(cfg, lambda component: build_reward(component, device))
    elif cfg.name in BUILTIN:
        model = BUILTIN[cfg.name]()
    elif cfg.name in EXTERNAL:
        module, fn = EXTERNAL[cfg.name].split(":")
        model = getattr(importlib.import_module(module), fn)(cfg)
        apply_preprocessing_options(model, cfg)
        model.store_weights(to_dtype(cfg.weight_dtype, STORAGE_DTYPES))  # bf16/fp16 storage, fp32 math: rewards/towers.py
    elif is_custom(cfg.name):
        from . import custom

        model = custom.build(cfg)  # its own weights and preprocessing: validation refuses the knobs above
    else:
        raise ValueError(f"unknown reward {cfg.name!r}; choose one of {reward_names()}")
    return model.to(device).eval().requires_grad_(False)


def weight_free(cfg):
    """``cfg`` (a RewardConfig) with random weights of the same architectures wherever it loads files (every
    packaged reward, every packaged component of a mixture): what the planner builds on the meta device."""
    if cfg.name.startswith("builtin:") or is_custom(cfg.name):
        return cfg
    full = lambda spec: spec if random_size(spec) else "random"  # noqa: E731
    return dataclasses.replace(cfg, checkpoint=full(cfg.checkpoint),
                               checkpoints={k: full(v) for k, v in cfg.checkpoints.items()})


__all__ = ["MIX", "MixtureReward", "RewardModel", "apply_preprocessing_options", "build_reward", "is_custom",
           "known_reward", "reward_names", "weight_free"]
