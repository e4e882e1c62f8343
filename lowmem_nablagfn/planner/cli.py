"""``lowmem-nablagfn plan``: the per-phase report of one configuration, the presets x cards table, and
the subcommand's ``add_parser`` / ``run`` (the contract of :mod:`lowmem_nablagfn.cli`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import Config, list_presets, load_config
from ..memtrack import GiB
from .gpu import (CARD_CAPABILITY, CARDS, DEFAULT_CAPABILITY, MIN_SLACK_GIB, attention_kernels, card_context_gib,
                  cuda_vram_gib, fragmentation_default, parse_vram)
from .prediction import Prediction, predict
from .probes import Probes
from .search import official_baseline, propose

def prediction_table(pred: Prediction, measured: Optional[Dict[str, float]] = None) -> str:
    head = "| phase | predicted peak (GiB) |" + (" measured (GiB) | error |" if measured else "")
    lines = [head, "| --- | ---: |" + (" ---: | ---: |" if measured else "")]
    for name in pred.phases:  # the memory plan's order
        row = f"| {name} | {pred.phases[name] / GiB:.3f} |"
        if measured:
            got = measured.get(name)
            row += (f" {got / GiB:.3f} | {pred.phases[name] / got - 1:+.1%} |" if got else " – | – |")
        lines.append(row)
    return "\n".join(lines)


def describe(cfg: Config, profile: Probes, vram_gib: Optional[float] = None,
             fragmentation: Optional[float] = None, context_gib: Optional[float] = None,
             capability: Optional[Tuple[int, int]] = None) -> Tuple[str, dict]:
    """Human-readable plan of ``cfg`` (and a proposal when ``vram_gib`` is given), plus a JSON summary."""
    pred = predict(cfg, profile, capability)
    frag = fragmentation_default() if fragmentation is None else fragmentation
    ctx = card_context_gib(pred.capability) if context_gib is None else context_gib
    kernels = ", ".join(f"{k} {v}" for k, v in pred.kernels.items())
    out = [f"model: {profile.source}, {cfg.sampling.resolution} px, {cfg.training.mixed_precision}, "
           f"reward {cfg.reward.name}; {'no-flow' if cfg.model.no_flow else 'residual'}, "
           f"memory.mode={cfg.memory.mode}, memory.attention={cfg.memory.attention}"
           + (f" (sm{pred.capability[0]}{pred.capability[1]}: {kernels})" if kernels else ""),
           "", prediction_table(pred), "",
           "resident: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in pred.resident.items()),
           f"predicted peak (max_memory_allocated): {pred.peak / GiB:.2f} GiB in {pred.peak_phase}"
           + (f", of which {pred.allowances[pred.peak_phase] / GiB:.2f} GiB cuDNN workspace and attention "
              f"scratch allowances" if pred.allowances.get(pred.peak_phase) else "")
           + f"; reserved (+{frag:.0%} fragmentation): {pred.reserved_gib(frag):.2f} GiB; needs with the "
           f"CUDA context ({ctx} GiB) and the minimum slack ({MIN_SLACK_GIB} GiB): "
           f"{pred.required_gib(frag, ctx):.2f} GiB; estimated work {pred.tflop_per_update:.1f} TFLOP per update"]
    out += [f"warning: {n}" for n in pred.notes]
    summary = {"phases_gib": {k: v / GiB for k, v in pred.phases.items()}, "peak_gib": pred.peak / GiB,
               "peak_phase": pred.peak_phase, "reserved_gib": pred.reserved_gib(frag),
               "required_gib": pred.required_gib(frag, ctx), "min_slack_gib": MIN_SLACK_GIB,
               "attention_kernels": pred.kernels, "notes": pred.notes,
               "tflop_per_update": pred.tflop_per_update}
    if vram_gib is not None:
        fits = pred.fits(vram_gib, frag, ctx)
        prop = propose(cfg, profile, vram_gib, frag, ctx, capability)
        summary.update(vram_gib=vram_gib, fits=fits)
        out.append(f"card: {vram_gib:.1f} GiB -> {'fits' if fits else 'does NOT fit'} "
                   f"(slack {vram_gib - pred.required_gib(frag, ctx) + MIN_SLACK_GIB:.2f} GiB; "
                   f"fitting needs >= {MIN_SLACK_GIB} GiB)")
        if prop is None:
            out.append("no configuration of the searched knobs fits this card")
        elif prop.overrides and (not fits or prop.prediction.tflop_per_update < pred.tflop_per_update * 0.98):
            word = "proposed" if not fits else "faster and fits"
            out.append(f"{word} (tier {prop.tier}): {' '.join(prop.overrides)}")
            out.append(f"  predicted peak {prop.prediction.peak / GiB:.2f} GiB ({prop.prediction.peak_phase}), "
                       f"slack {vram_gib - prop.prediction.required_gib(frag, ctx) + MIN_SLACK_GIB:.2f} GiB, "
                       f"work {prop.prediction.tflop_per_update:.1f} TFLOP per update")
        if prop is not None:
            summary.update(proposal=prop.overrides, proposal_peak_gib=prop.prediction.peak / GiB,
                           proposal_tier=prop.tier)
    return "\n".join(out), summary


def table(presets: Sequence[str], cards: Dict[str, float], verbose: bool = False,
          fragmentation: Optional[float] = None, context_gib: Optional[float] = None) -> str:
    """Markdown: for each preset and card, the predicted peaks of the official schedule and of the
    preset, and the proposed settings with their estimated work per update relative to the official
    schedule's (the attention kernel and CUDA context of the card class, :data:`CARD_CAPABILITY`)."""
    lines = ["| preset | card (GiB) | official peak (GiB) | preset peak (GiB) | preset fits | proposed overrides "
             "| proposed peak (GiB) | slack (GiB) | est. work vs official |",
             "| --- | --- | ---: | ---: | :---: | --- | ---: | ---: | ---: |"]
    for name in presets:
        cfg = load_config(name)
        profile = Probes(cfg, verbose=verbose)
        for card, gib in cards.items():
            cap = CARD_CAPABILITY.get(card, DEFAULT_CAPABILITY)
            kernels = attention_kernels(cfg, profile.models, cap)
            if "math" in kernels.values() and cfg.memory.attention != "math":
                # a misconfiguration to fix, not to plan around (the math kernel's matrices are GiBs)
                lines.append(f"| {name} | {card} ({gib:g}) | – | – | – | {cfg.training.mixed_precision} attention "
                             f"has no fused kernel on sm{cap[0]}{cap[1]} (math kernel): set "
                             f"`training.mixed_precision=fp16` | – | – | – |")
                continue
            pred = predict(cfg, profile, cap)
            official = predict(official_baseline(cfg), profile, cap)
            prop = propose(cfg, profile, gib, fragmentation, context_gib, cap)
            fits = pred.fits(gib, fragmentation, context_gib)
            if prop is None:
                settings, peak, slack, work = "nothing fits", "–", "–", "–"
            else:
                settings = " ".join(f"`{o}`" for o in prop.overrides) or "as is"
                peak = f"{prop.prediction.peak / GiB:.2f}"
                slack = f"{gib - prop.prediction.required_gib(fragmentation, context_gib) + MIN_SLACK_GIB:.2f}"
                work = f"{prop.prediction.tflop_per_update / official.tflop_per_update:.2f}x"
            lines.append(f"| {name} | {card} ({gib:g}) | {official.peak / GiB:.2f} | {pred.peak / GiB:.2f} | "
                         f"{'yes' if fits else 'no'} | {settings} | {peak} | {slack} | {work} |")
    return "\n".join(lines)


def gpu_presets() -> List[str]:
    return [p for p in list_presets() if load_config(p).device != "cpu"]


def add_parser(subparsers) -> None:
    """``lowmem-nablagfn plan``: its flags (see :mod:`lowmem_nablagfn.cli` for the contract)."""
    from ..config import add_config_arguments

    p = subparsers.add_parser("plan", help="predict peak memory phase by phase (no GPU needed); propose settings")
    add_config_arguments(p)
    p.add_argument("--vram", help="card memory (24GB, 16000MB) or name (RTX4090-24, A100-80, ...); "
                                  "default: this machine's GPU, if any")
    p.add_argument("--table", action="store_true", help="markdown table: every GPU preset x card")
    p.add_argument("--headroom", type=float, default=None,
                   help="allocator fragmentation as a fraction of the peak (default 0.05 with "
                        "expandable segments, 0.15 without: planner.FRAGMENTATION)")
    p.add_argument("--json", metavar="PATH", help="write the prediction as JSON")
    p.add_argument("--verbose", action="store_true", help="report each traced probe")


def run(args) -> int:
    """``lowmem-nablagfn plan``: ``args.cfg`` is the loaded, checked configuration. Exit code 0 when it
    fits (or no card is known), 1 when not."""
    cfg = args.cfg
    frag = None if args.headroom is None else args.headroom
    if args.table:
        print(table(gpu_presets(), CARDS, verbose=args.verbose, fragmentation=frag))
        return 0
    vram = parse_vram(args.vram) if args.vram else cuda_vram_gib()
    cap = None
    if args.vram:  # a card name gives its class; a bare size keeps this machine's (or the default)
        cap = next((c for n, c in CARD_CAPABILITY.items()
                    if args.vram.lower().replace("-", "") == n.lower().replace("-", "")), None)
    text, summary = describe(cfg, Probes(cfg, verbose=args.verbose), vram, frag, capability=cap)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary.get("fits", True) else 1
