"""Search: the fastest configuration of the same update that fits a card, and the checks ``train`` runs.

Candidates keep the objective and everything that changes the update's numbers and vary the exact
memory knobs (:data:`KNOBS`), tier by tier (see :mod:`lowmem_nablagfn.planner`); :func:`propose` takes
the first tier with a fitting candidate and the fastest inside it.  :func:`check_fits` and
:func:`fit_check` are the refusal ``train`` prints; :func:`official_baseline` is the official code's
schedule, the baseline of every "vs" figure.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple

from ..config import Config, to_dict
from ..memory import OFFICIAL, Batches, MemoryPlan, official_memory
from ..memtrack import GiB
from . import gpu
from .gpu import MIN_SLACK_GIB, attention_kernels, card_context_gib, default_capability, fragmentation_default
from .prediction import Prediction, predict
from .probes import Probes


KNOBS = ("memory.checkpoint_unet", "memory.checkpoint_vae", "memory.checkpoint_reward", "memory.checkpoint_flow",
         "memory.input_grad_chunk", "memory.train_chunk", "training.batch_size",
         "training.gradient_accumulation_steps", "sampling.batch_size", "sampling.num_batches_per_epoch",
         "memory.offload_text_encoder", "memory.offload_trajectories", "training.optimizer", "model.no_flow",
         "memory.mode")


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: Config, key: str, value) -> None:
    *path, last = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def overrides(base: Config, cand: Config) -> List[str]:
    """The dotted ``key=value`` overrides that turn ``base`` into ``cand``."""
    out = []
    for key in KNOBS:
        a, b = _get(base, key), _get(cand, key)
        if a != b:
            out.append(f"{key}={str(b).lower() if isinstance(b, bool) else b}")
    return out


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _chunks(rows: int) -> List[int]:
    sizes = [0] + [c for c in (1, 2, 3, 4, 6, 8, 12, 16) if c < rows]
    return sizes


def candidates(cfg: Config, st: dict, tier: int) -> Iterator[Config]:
    """Configurations of one tier (see the module docstring), all computing the same update."""
    t, s = cfg.training, cfg.sampling
    per_update, per_epoch = Batches.of(cfg).trajectories_per_update, Batches.of(cfg).trajectories_per_epoch
    mem, training, model = replace(cfg.memory, mode="optimized"), cfg.training, cfg.model
    if tier >= 2:
        mem = replace(mem, offload_text_encoder=True, offload_trajectories=True)
    if tier >= 3 and training.optimizer == "adamw" and cfg.distributed.backend == "ddp":
        training = replace(training, optimizer="adamw8bit")
    if tier >= 4:
        model = replace(model, no_flow=True)
    residual = not model.no_flow
    kept = Batches.of(cfg).kept
    flag_sets = list(itertools.product((False, True), (False, True),
                                       (False, True) if st["reward_has_blocks"] else (False,),
                                       (False, True) if residual else (False,)))
    batches = [b for b in _divisors(t.batch_size) if per_update % b == 0 and per_epoch % b == 0]
    for (cu, cv, cr, cf), b, sb in itertools.product(flag_sets, batches, _divisors(s.batch_size)):
        rows = b * kept
        tr = replace(training, batch_size=b, gradient_accumulation_steps=per_update // b)
        sa = replace(s, batch_size=sb, num_batches_per_epoch=per_epoch // sb)
        for ci, ct in itertools.product(_chunks(rows), _chunks(rows)):
            m = replace(mem, checkpoint_unet=cu, checkpoint_vae=cv, checkpoint_reward=cr, checkpoint_flow=cf,
                        input_grad_chunk=ci, train_chunk=ct)
            yield replace(cfg, memory=m, training=tr, sampling=sa, model=model)


@dataclass
class Proposal:
    config: Config
    prediction: Prediction
    overrides: List[str]
    tier: int


def _evaluated(cfg: Config, profile: Probes, tier: int,
               capability: Optional[Tuple[int, int]] = None) -> List[Tuple[tuple, Config, Prediction]]:
    """Every distinct candidate of a tier with its prediction and rank (memoised on the profile).

    Cards whose attention runs on the math kernel in the same models share the bytes and the work
    (only the CUDA context differs, which :func:`propose` adds), so they share the evaluation."""
    math_parts = ()
    if cfg.device != "cpu":
        kernels = attention_kernels(cfg, profile.models, tuple(capability or default_capability(cfg)))
        math_parts = tuple(sorted(k for k, v in kernels.items() if v == "math"))
    key = (json.dumps(to_dict(cfg), sort_keys=True, default=str), tier, math_parts)
    memo = profile.__dict__.setdefault("_evaluated", {})
    if key not in memo:
        out, seen = [], set()
        for cand in candidates(cfg, profile.static, tier):
            ov = tuple(overrides(cfg, cand))
            if ov in seen:
                continue
            seen.add(ov)
            pred = predict(cand, profile, capability)
            # estimates within 1 % are ties: then the larger training and sampling batches win
            rank = (round(math.log(max(pred.tflop_per_update, 1e-9)) / math.log(1.01)),
                    -cand.training.batch_size, -cand.sampling.batch_size, len(ov), ov)
            out.append((rank, cand, pred))
        out.sort(key=lambda item: item[0])
        memo[key] = out
    return memo[key]


def propose(cfg: Config, profile: Probes, vram_gib: float, fragmentation: Optional[float] = None,
            context_gib: Optional[float] = None,
            capability: Optional[Tuple[int, int]] = None) -> Optional[Proposal]:
    """The fastest configuration that fits ``vram_gib`` with :data:`MIN_SLACK_GIB` to spare, from
    the first tier with one; None if none fits."""
    cap = tuple(capability or default_capability(cfg))
    ctx = card_context_gib(cap) if context_gib is None else context_gib
    for tier in (1, 2, 3, 4):
        if tier == 4 and cfg.model.no_flow:
            break
        for rank, cand, pred in _evaluated(cfg, profile, tier, cap):
            if pred.fits(vram_gib, fragmentation, ctx):
                return Proposal(cand, predict(cand, profile, cap), overrides(cfg, cand), tier)
    return None


def check_fits(cfg: Config, vram_gib: float, verbose: bool = False,
               plan: Optional[MemoryPlan] = None) -> Optional[str]:
    """None when ``cfg`` is predicted to fit ``vram_gib``; else the refusal message with a proposal.
    ``plan``: the run's memory plan of ``cfg`` (default: built here)."""
    import sys

    profile = Probes(cfg, verbose=verbose)
    pred = predict(cfg, profile, plan=plan)
    for note in pred.notes:
        print(f"warning: {note}", file=sys.stderr)
    if pred.fits(vram_gib):
        return None
    prop = propose(cfg, profile, vram_gib)
    frag = fragmentation_default()
    msg = (f"this configuration is predicted not to fit this GPU: peak {pred.peak / GiB:.2f} GiB in "
           f"{pred.peak_phase} (+{frag:.0%} fragmentation + {card_context_gib(pred.capability)} GiB CUDA "
           f"context + {MIN_SLACK_GIB} GiB minimum slack = {pred.required_gib():.2f} GiB) > {vram_gib:.1f} GiB.")
    if prop is not None:
        msg += (f"\nProposed: add the overrides\n    {' '.join(prop.overrides)}\n"
                f"(predicted peak {prop.prediction.peak / GiB:.2f} GiB). ")
    else:
        msg += "\nNo combination of the memory options fits; use a larger GPU. "
    msg += "Run `lowmem-nablagfn plan` for details, or pass --force to train anyway."
    return msg


#: The official code's schedule and retention at the same batch sizes (``memory.OFFICIAL``, the one
#: definition) as command-line overrides: the baseline of every "vs" figure (planner table,
#: benchmarks/memory.py, update_time.py, plan_targets.py, gpu_validate.py).
OFFICIAL_OVERRIDES = [f"memory.{k}={str(v).lower()}" for k, v in OFFICIAL.items()]


def official_baseline(cfg: Config) -> Config:
    """``cfg`` with the official code's memory schedule (:func:`~lowmem_nablagfn.memory.official_memory`)."""
    out = copy.deepcopy(cfg)
    out.memory = official_memory(out.memory)
    return out


def fit_check(cfg: Config, plan: Optional[MemoryPlan] = None) -> Optional[str]:
    """The check ``train`` runs first: None on the CPU or when ``cfg`` is predicted to fit the GPU,
    else the refusal message (with the proposed overrides).  ``plan``: the run's memory plan."""
    if cfg.device == "cpu":
        return None
    vram = gpu.cuda_vram_gib()  # looked up at call time: tests stand in a card
    if vram is None:
        return None
    return check_fits(cfg, vram, verbose=True, plan=plan)  # an architecture traced for the first time takes minutes

