"""A weighted mixture of rewards: ``reward.name=mix``, ``reward.mix={aesthetic: 1.0, pickscore: 0.5}``.

    R(x, c) = Σ_i w_i · R_i(x, c)          (w_i > 0, at least two components)

Each component is built as ``reward.name=<component>`` would build it, with the rest of ``reward.*``:
``reward.weight_dtype`` and ``reward.antialias`` apply to every packaged component, ``reward.checkpoint``
may only be ``random`` / ``random:reduced`` (profiling, tests) and then applies to every packaged
component, and ``reward.checkpoints.<name>`` / ``reward.backbones.<name>`` give one component its own
files (each reward has its own backbone, so one ``reward.backbone`` cannot serve them all).

The components are submodules of :class:`MixtureReward`, so ``.to()``, ``eval()``, ``requires_grad_`` and
the planner's weight count reach each; ``memory.checkpoint_reward`` is passed to every component with
transformer blocks (:class:`CheckpointedMixtureReward`).  The forward builds every component's graph on
the same images and sums them: the trainer's one input-gradient backward goes through all of them, and
the planner traces this module as "the reward", so its activation memory is that of all components.

Logging (:mod:`lowmem_nablagfn.loop`): each forward keeps its components' scores (detached) in
``last_scores``; the trainer's final-reward pass files them with :meth:`MixtureReward.log_last`, and the
epoch's metrics take them back with :meth:`MixtureReward.pop_log` (``reward/<component>/mean``, ``/std``).
:meth:`MixtureReward.gradient_sq_norms` gives the gradient-norm shares (``reward/<component>/grad_share``):

    share_i = ‖w_i ∇_x R_i‖ / Σ_j ‖w_j ∇_x R_j‖,

the gradients taken with respect to the decoded final images ``x`` of the epoch's first sampled rows
(the norm over all those rows and pixels, and over every rank).  The shares sum to one; a component
whose share stays near zero barely steers training, whatever its weight says.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .base import RewardModel
from .custom import is_custom, split_name

#: ``reward.name`` of a mixture.
MIX = "mix"
DOC = "docs/rewards.md#mixtures"


def component_label(name: str) -> str:
    """A component's name in the metrics: ``builtin:redness`` -> ``redness``, ``aesthetic`` as is, a custom
    ``path/to/score.py:build`` -> ``score.build`` (characters other than letters, digits, ``.``, ``-`` and
    ``_`` become ``_``, so that TensorBoard keeps the tag as written)."""
    split = split_name(name)
    if name.startswith("builtin:"):
        base = name[len("builtin:"):]
    elif split is not None:
        target, fn = split
        base = f"{Path(target).stem if target.endswith('.py') else target.rsplit('.', 1)[-1]}.{fn}"
    else:
        base = name
    return re.sub(r"[^\w.-]", "_", base)


def component_config(cfg, name: str):
    """The :class:`~lowmem_nablagfn.config.RewardConfig` that builds component ``name`` of the mixture ``cfg``."""
    from . import EXTERNAL

    packaged = name in EXTERNAL
    return dataclasses.replace(
        cfg, name=name, mix={}, checkpoints={}, backbones={},
        checkpoint=cfg.checkpoints.get(name, cfg.checkpoint) if packaged else None,
        backbone=cfg.backbones.get(name) if packaged else None,
        weight_dtype=cfg.weight_dtype if packaged else "fp32",
        antialias=cfg.antialias if packaged else None,
        max_length=cfg.max_length if name == "imagereward" else None)


def components(cfg) -> List[Tuple[str, float, object]]:
    """(name, weight, RewardConfig) of every component of ``cfg`` (a mixture), in the order given."""
    return [(name, float(w), component_config(cfg, name)) for name, w in cfg.mix.items()]


class MixtureReward(RewardModel):
    """``Σ w_i R_i`` of its components (see the module docstring).

    Args:
        parts: the component rewards, each a :class:`RewardModel` (images, prompts) -> (B,).
        weights: their weights (> 0), in the same order.
        labels: their names in the metrics (:func:`component_label`).
    """

    def __init__(self, parts: Sequence[nn.Module], weights: Sequence[float], labels: Sequence[str]):
        super().__init__()
        if not (len(parts) == len(weights) == len(labels)) or len(set(labels)) != len(labels):
            raise ValueError(f"a mixture needs one weight and one distinct label per component, got "
                             f"{len(parts)} components, weights {list(weights)}, labels {list(labels)}")
        self.parts = nn.ModuleList(parts)  # a list: component names may hold '.', which a ModuleDict refuses
        self.weights = [float(w) for w in weights]
        self.labels = list(labels)
        self.prompt_free = all(getattr(p, "prompt_free", False) for p in parts)
        self.last_scores: Dict[str, Tensor] = {}
        self._log: List[Dict[str, Tensor]] = []

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        total, scores = None, {}
        for label, w, part in zip(self.labels, self.weights, self.parts):
            r = part(images, prompts)
            scores[label] = r.detach()
            total = w * r if total is None else total + w * r
        self.last_scores = scores
        return total

    def log_last(self) -> None:
        """File the last forward's component scores (host memory) for :meth:`pop_log`."""
        self._log.append({k: v.float().cpu() for k, v in self.last_scores.items()})

    def pop_log(self) -> Dict[str, Tensor]:
        """{label: (N,) scores} of every forward filed since the last call, concatenated; the log is emptied."""
        log, self._log = self._log, []
        return {k: torch.cat([entry[k] for entry in log]) for k in self.labels} if log else {}

    @torch.enable_grad()
    def gradient_sq_norms(self, images: Tensor, prompts: Sequence[str]) -> Dict[str, float]:
        """{label: ‖w_i ∇_x Σ_rows R_i(x)‖²}, one component's backward at a time (its graph freed before the
        next one is built, so the pass holds less than the mixture's own backward)."""
        out = {}
        for label, w, part in zip(self.labels, self.weights, self.parts):
            x = images.detach().float().requires_grad_(True)
            (grad,) = torch.autograd.grad(part(x, prompts).sum(), x)
            out[label] = float((w * grad).square().sum())
        return out


class CheckpointedMixtureReward(MixtureReward):
    """A mixture with at least one component that has transformer blocks (``memory.checkpoint_reward``)."""

    def set_checkpointing(self, enabled: bool = True) -> "CheckpointedMixtureReward":
        for part in self.parts:
            if callable(getattr(part, "set_checkpointing", None)):
                part.set_checkpointing(bool(enabled))
        return self


def build(cfg, build_one) -> MixtureReward:
    """The mixture of ``cfg`` (a RewardConfig with ``name=mix``), each component built by ``build_one(cfg)``."""
    from .loading import MissingCheckpointError

    names, weights, parts = [], [], []
    for name, weight, sub in components(cfg):
        names.append(name)
        weights.append(weight)
        try:
            parts.append(build_one(sub))
        except MissingCheckpointError as exc:  # its "how to" names the keys of a single reward: name the component's
            how = str(exc).replace("reward.backbone=", f"reward.backbones.{name}=")
            raise MissingCheckpointError(f"reward.mix: {name}: "
                                         + how.replace("reward.checkpoint=", f"reward.checkpoints.{name}=")) from exc
    blocks = any(callable(getattr(p, "set_checkpointing", None)) for p in parts)
    cls = CheckpointedMixtureReward if blocks else MixtureReward
    return cls(parts, weights, [component_label(n) for n in names])


def component_metrics(scores: Dict[str, Tensor]) -> Dict[str, float]:
    """``reward/<label>/mean`` and ``/std`` of each component's (N,) scores."""
    out = {}
    for label, v in scores.items():
        out[f"reward/{label}/mean"] = float(v.mean())
        out[f"reward/{label}/std"] = float(v.std()) if v.numel() > 1 else 0.0
    return out


def grad_shares(sq_norms: Dict[str, float]) -> Dict[str, float]:
    """``reward/<label>/grad_share`` = ‖w_i ∇R_i‖ / Σ_j ‖w_j ∇R_j‖ from the squared norms (summed or
    averaged over ranks: the same shares); none when every gradient is zero (no share is defined)."""
    norms = {k: math.sqrt(max(v, 0.0)) for k, v in sq_norms.items()}
    total = sum(norms.values())
    if not total > 0 or not math.isfinite(total):
        return {}
    return {f"reward/{k}/grad_share": v / total for k, v in norms.items()}


# ----------------------------------------------------------------------------- validation

def _identity(name: str):
    """What a component name points at: two spellings of one custom file are the same reward."""
    split = split_name(name)
    if split is None:
        return name
    target, fn = split
    return (str(Path(target).expanduser().resolve()) if target.endswith(".py") else target, fn)


def problems(cfg, resolution: int = 64) -> List[str]:
    """What is wrong with the mixture options of ``cfg`` (a RewardConfig), one line each; [] when fine.

    Not a mixture: ``reward.mix`` / ``checkpoints`` / ``backbones`` must be empty.  A mixture: two or more
    known, distinct components with finite weights > 0; per-component files only for packaged components
    of the mixture; ``reward.backbone`` unset and ``reward.checkpoint`` unset or random; a custom component
    is tried on one random image (:func:`~.custom.check`)."""
    from . import EXTERNAL, known_reward, reward_names
    from .custom import check as check_custom
    from .loading import random_size

    out = []
    if cfg.name != MIX:
        for key in ("mix", "checkpoints", "backbones"):
            if getattr(cfg, key):
                out.append(f"reward.{key}={dict(getattr(cfg, key))} is only read for a mixture, but reward.name="
                           f"{cfg.name!r}; set reward.name=mix to train the mixture, or remove reward.{key}")
        return out
    if not cfg.mix:
        return [f"reward.name=mix needs its components and weights, e.g. reward.mix={{aesthetic: 1.0, pickscore: 0.5}} "
                f"({DOC})"]
    if len(cfg.mix) == 1:
        (name,) = cfg.mix
        out.append(f"reward.mix={dict(cfg.mix)} has one component; train it as reward.name={name} (a weight on a "
                   f"single reward is a factor of model.reward_scale)")
    seen: Dict[object, str] = {}
    labels: Dict[str, str] = {}
    for name, weight in cfg.mix.items():
        if not known_reward(name):
            out.append(f"reward.mix: unknown reward {name!r}; choose among {', '.join(reward_names())}, or your own "
                       f"path/to/my_reward.py:build (docs/rewards-custom.md)")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            out.append(f"reward.mix: the weight of {name} is {weight}; give a finite weight > 0 (drop a reward "
                       f"from the mixture rather than weighting it 0)")
        ident, label = _identity(name), component_label(name)
        if ident in seen or label in labels:
            other = seen.get(ident, labels.get(label))
            why = "the same reward" if ident in seen else f"the same metric name reward/{label}/..."
            out.append(f"reward.mix names {other!r} and {name!r}, {why}; give each reward once")
        seen.setdefault(ident, name)
        labels.setdefault(label, name)
    if cfg.backbone is not None:
        out.append(f"reward.backbone={cfg.backbone!r} is ambiguous in a mixture (each reward has its own backbone); "
                   f"give it per component as reward.backbones.<name>=DIR")
    if cfg.checkpoint is not None and random_size(cfg.checkpoint) is None:
        out.append(f"reward.checkpoint={cfg.checkpoint!r} is ambiguous in a mixture; give it per component as "
                   f"reward.checkpoints.<name>=PATH (reward.checkpoint takes only random / random:reduced here)")
    for key in ("checkpoints", "backbones"):
        for name, value in getattr(cfg, key).items():
            if name not in cfg.mix:
                out.append(f"reward.{key}.{name}={value!r} names no component of reward.mix "
                           f"({', '.join(cfg.mix)}); remove it or add {name} to the mixture")
            elif name not in EXTERNAL:
                out.append(f"reward.{key}.{name}={value!r}: {name} loads no files (a built-in or custom reward); "
                           f"remove it")
            elif key == "checkpoints" and name in ("pickscore", "clipscore") and random_size(value) is None:
                out.append(f"reward.checkpoints.{name}={value!r}: {name} is one transformers CLIP folder; pass it as "
                           f"reward.backbones.{name}=DIR and leave its checkpoint unset (or random / random:reduced)")
    packaged = [n for n in cfg.mix if n in EXTERNAL]
    if cfg.antialias is not None and not packaged:
        out.append(f"reward.antialias={cfg.antialias} has no effect: no component of reward.mix resizes (built-in "
                   f"and custom rewards do their own); remove it")
    if cfg.max_length is not None and "imagereward" not in cfg.mix:
        out.append(f"reward.max_length={cfg.max_length} is only used by imagereward, which is not in reward.mix; "
                   f"remove it")
    for name in cfg.mix:
        if is_custom(name):
            out += check_custom(component_config(cfg, name), resolution)
    return out


__all__ = ["CheckpointedMixtureReward", "MIX", "MixtureReward", "build", "component_config",
           "component_label", "component_metrics", "components", "grad_shares", "problems"]
