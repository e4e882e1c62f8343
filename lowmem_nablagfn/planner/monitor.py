"""The memory of the reward-hacking monitor (``monitor.*``, :mod:`lowmem_nablagfn.monitor`), for the prediction.

Every ``monitor.every`` epochs the monitor samples its held-out images, decodes them and scores them
with the trained reward and its diversity embedding — the passes of the ``encode``, ``sampling`` and
``final_reward`` phases, on at most ``sampling.batch_size`` rows, so never above those phases — and
then moves each watched reward to the device in turn to score the images (kept on the host) one
sampling batch at a time.  What is new is that last step: one watched reward's weights, its no-grad
forward and a batch of images on the device, above the sampling phases' resident bytes.  The watched
rewards live in host memory in between, which on ``device=cpu`` is the device's own memory.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Dict, Optional


from ..config import Config, to_dict
from .probes import Probes


@dataclass
class MonitorCost:
    """The monitor's bytes (per process; the monitor runs on rank 0 only)."""

    phase: float
    """Bytes the ``monitor`` phase adds above the sampling phases' resident bytes (``base + traj_sample``
    in :func:`~lowmem_nablagfn.planner.predict`): the largest, over the watched rewards, of its weights
    plus its no-grad forward on ``rows`` images plus those images (fp32)."""
    host_resident: float
    """Bytes of every watched reward's weights, kept in host memory through the run: on ``device=cpu``
    the device's own memory, so every phase carries them; on a GPU, not device memory."""
    rows: int
    """Images per scoring call: ``min(sampling.batch_size, held-out images)``."""
    per_reward: Dict[str, float]
    """The phase's bytes with each watched reward (weights + forward + images)."""


def monitor_cost(cfg: Config, profile: Optional[Probes] = None) -> Optional[MonitorCost]:
    """What the monitor adds to the memory of ``cfg``; None when ``monitor.rewards`` is empty.

    Each watched reward's weights and no-grad forward come from its own profile: ``cfg`` with that
    reward as ``reward`` (:func:`~lowmem_nablagfn.monitor.reward_config`), probed like the trained
    reward (``reward_nograd``: traced once, then cached).  ``profile``: the run's profile, whose
    ``cache`` / ``allow_trace`` / ``verbose`` settings the watched rewards' profiles take.

    The planner's phase is then ``phases["monitor"] = base + traj_sample + cost.phase`` (plus, on a
    GPU, the no-grad cuDNN workspace allowance, as for ``final_reward``), and on ``device=cpu``
    ``cost.host_resident`` is added to every phase.
    """
    mon = cfg.monitor
    if not mon.rewards:
        return None
    # the search predicts hundreds of candidates of one run: each watched reward's profile is built once
    key = ("monitor_cost", json.dumps(to_dict(cfg.monitor), sort_keys=True), cfg.sampling.batch_size,
           cfg.sampling.resolution, cfg.prompts.set)
    memo = profile.__dict__.setdefault("_monitor_costs", {}) if profile is not None else {}
    if key not in memo:
        memo[key] = _monitor_cost(cfg, profile)
    return memo[key]


def _monitor_cost(cfg: Config, profile: Optional[Probes]) -> MonitorCost:
    from ..monitor import held_out_prompts, reward_config

    mon = cfg.monitor
    rows = min(cfg.sampling.batch_size, len(held_out_prompts(cfg)) * mon.images_per_prompt)
    side = cfg.sampling.resolution
    images = 4.0 * rows * 3 * side * side
    settings = {"cache": True, "allow_trace": True, "verbose": False}
    if profile is not None:
        settings = {"cache": profile.cache, "allow_trace": profile.allow_trace, "verbose": profile.verbose}
    per_reward, weights = {}, 0.0
    for name in mon.rewards:
        watched = copy.deepcopy(cfg)
        watched.reward = reward_config(cfg, name)
        p = Probes(watched, **settings)
        weights += p.static["reward"]
        per_reward[name] = p.static["reward"] + p.get("reward_nograd", rows=rows)["Pi"] + images
    return MonitorCost(max(per_reward.values()), weights, rows, per_reward)
