"""Planner predictions for the GPU memory targets (no GPU needed).

    python benchmarks/plan_targets.py [--no-results]

Targets (SD 1.5, 512 px, CFG 5, aesthetic reward with a fp32 CLIP ViT-L/14): full residual at train
batch 4 <= 12 GB, at train batch 1 <= 10 GB, no-flow at batch 4 <= 8 GB, time <= 1.3x the official
schedule.  For each: the official schedule's predicted peak (memory.mode=official: one graph per
transition slot, no checkpointing, every step stored — ``planner.OFFICIAL_OVERRIDES``), the most frugal
settings (everything checkpointed, chunks of 1), and the fastest configuration the planner fits on a
card of that size (``Prediction.fits``: reserved + CUDA context + the minimum slack <= card), with their
estimated work per update relative to the official schedule (traced FLOPs + per-call overhead: an
estimate, not a measured time).  Base: the sd15_rtx4090 preset.  Prints a table, appends it to RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from lowmem_nablagfn import planner  # noqa: E402
from lowmem_nablagfn.config import load_config  # noqa: E402
from lowmem_nablagfn.memtrack import GiB  # noqa: E402

TARGETS = [("residual, train batch 4", [], 12.0),
           ("residual, train batch 1", ["training.batch_size=1", "training.gradient_accumulation_steps=4"], 10.0),
           ("no-flow, train batch 4", ["model.no_flow=true"], 8.0)]
FRUGAL = ["memory.checkpoint_unet=true", "memory.checkpoint_vae=true", "memory.checkpoint_reward=true",
          "memory.input_grad_chunk=1", "memory.train_chunk=1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd15_rtx4090")
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()
    lines = ["| target | card (GiB) | official: peak (GiB), phase | most frugal (all checkpointing, chunks of 1): "
             "peak, work vs official | fastest fitting the card: overrides | its peak (GiB) | its slack (GiB) "
             "| its work vs official |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: |"]
    for name, extra, vram in TARGETS:
        cfg = load_config(args.preset, extra)
        profile = planner.Probes(cfg, verbose=True)
        official = planner.predict(load_config(args.preset, extra + planner.OFFICIAL_OVERRIDES), profile)
        frugal_cfg = load_config(args.preset, extra + FRUGAL + [f"memory.checkpoint_flow={not cfg.model.no_flow}"])
        frugal = planner.predict(frugal_cfg, profile)
        prop = planner.propose(cfg, profile, vram)
        fastest = ("none fits", "–", "–", "–") if prop is None else (
            " ".join(f"`{o}`" for o in prop.overrides) or "as is", f"{prop.prediction.peak / GiB:.2f}",
            f"{vram - prop.prediction.required_gib() + planner.MIN_SLACK_GIB:.2f}",
            f"{prop.prediction.tflop_per_update / official.tflop_per_update:.2f}x")
        lines.append(f"| {name} | {vram:g} | {official.peak / GiB:.2f}, {official.peak_phase} | {frugal.peak / GiB:.2f}, "
                     f"{frugal.tflop_per_update / official.tflop_per_update:.2f}x | {' | '.join(fastest)} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_results:
        append_results("Planner: GPU memory targets (predicted, SD 1.5 at 512 px)", " ".join(["python"] + sys.argv),
                       table, f"Base preset {args.preset}; see benchmarks/plan_targets.py for the definitions.")


if __name__ == "__main__":
    main()
