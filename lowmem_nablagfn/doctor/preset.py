"""Checks of one preset (``doctor --preset P``): its files in the cache and the planner's verdict."""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from .rows import FAIL, NO_CUDA, OK, SKIP, WARN, Check, GiB

def _with_offline(fn, cfg) -> List[str]:
    """``fn(cfg)`` as if ``HF_HUB_OFFLINE`` were set: the set-up checks' "is it in the local cache" check."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return fn(cfg)
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def check_files(cfg) -> List[Check]:
    """The preset's model and reward files on disk or in the local hub cache (the set-up checks of lowmem_nablagfn.checks)."""
    from .. import checks
    from ..rewards.loading import hub_offline

    rows = []
    for name, fn, what in (("model files", checks.check_model, cfg.pretrained.model),
                           ("reward files", checks.check_reward_files, cfg.reward.name)):
        problems = _with_offline(fn, cfg)
        if not problems:
            rows.append(Check(name, OK, f"{what}: on disk or cached"))
        else:  # online, the first run downloads what is missing
            rows.append(Check(name, FAIL if hub_offline() else WARN, f"{what}: " + "; ".join(problems),
                              "download it now (the run would fetch it at start)" if not hub_offline() else
                              "the download (or local path) the detail names"))
    return rows


def _host_memory_gib() -> Optional[float]:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    except (ValueError, OSError, AttributeError):
        return None


def _fits_card(cfg, profile, card: str, gib: float) -> bool:
    """Does ``cfg`` fit the card class ``card`` (its own attention kernel)?  No when its dtype has no
    fused attention there (bf16 before sm80): the math kernel's trace is not shipped, and
    ``plan --table`` calls that a misconfiguration, not a fit."""
    from .. import planner

    try:
        return planner.predict(cfg, profile, planner.CARD_CAPABILITY[card]).fits(gib)
    except planner.MissingProbe:
        return False


def check_plan(cfg) -> List[Check]:
    """The planner's verdict for this configuration on the detected card (``plan`` with this machine's
    GPU); on a machine without one, the card classes it fits."""
    from .. import planner
    from ..memtrack import GiB as _GiB

    try:
        profile = planner.Probes(cfg, allow_trace=False)
        pred = planner.predict(cfg, profile, tuple(torch.cuda.get_device_capability())
                               if torch.cuda.is_available() and cfg.device != "cpu" else None)
    except planner.MissingProbe as exc:
        return [Check("planner", WARN, f"no shipped or cached trace of this model ({exc})",
                      "lowmem-nablagfn plan --preset ... traces it once (minutes of CPU)")]
    notes = "; ".join(pred.notes)
    if cfg.device == "cpu":
        host = _host_memory_gib()
        detail = f"device=cpu: predicted peak {pred.peak / _GiB:.2f} GiB of host memory" + (
            f" of {host:.0f} GiB" if host else "")
        status = FAIL if host and pred.peak / _GiB > host else OK
        return [Check("planner", status, detail, "a smaller preset, or a GPU" if status == FAIL else "")]
    need = pred.required_gib()
    if not torch.cuda.is_available():
        fits = [name for name, gib in planner.CARDS.items() if _fits_card(cfg, profile, name, gib)]
        return [Check("planner", SKIP, f"{NO_CUDA}: needs {need:.1f} GiB on a card (peak {pred.peak / _GiB:.1f} GiB "
                                       f"in {pred.peak_phase}); fits {', '.join(fits) or 'none of the card classes'}")]
    vram = planner.cuda_vram_gib()
    if pred.fits(vram):
        return [Check("planner", WARN if notes else OK, f"fits this card: needs {need:.1f} of {vram:.1f} GiB "
                                                        f"(peak in {pred.peak_phase})" + (f"; {notes}" if notes else ""),
                      "see the note" if notes else "")]
    prop = planner.propose(cfg, profile, vram, capability=pred.capability)
    fix = ("add " + " ".join(prop.overrides)) if prop is not None else "a larger card, or model.no_flow=true"
    return [Check("planner", FAIL, f"does NOT fit this card: needs {need:.1f} of {vram:.1f} GiB", fix)]

