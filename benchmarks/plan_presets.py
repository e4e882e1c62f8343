"""Planner predictions for a model family's presets on their target cards (no GPU needed).

    python benchmarks/plan_presets.py                   # SD 3.5 Medium (issue #26)
    python benchmarks/plan_presets.py --family sdxl     # SDXL base (issue #17)
    python benchmarks/plan_presets.py --no-results      # print only

For each target (a preset, overrides, a card): the predicted peak and its phase, the card memory it needs
with the planner's headroom (``Prediction.required_gib``: peak x (1 + fragmentation) + CUDA context + the
minimum slack), whether it fits, and its estimated work per update (traced FLOPs plus the per-call overhead)
relative to the fastest configuration of the same update when memory is ignored (``planner.propose`` on an
unlimited card) — the cost of the memory settings.  Read from the shipped traces (an architecture without
one is traced first and cached: SD 3.5 Medium at 1024 px takes about two minutes of one CPU core).
Prints a table, appends it to RESULTS.md.
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

#: (label, preset, overrides, card GiB, card compute capability); a 16 GB card is a consumer Ada (RTX 4080)
TARGETS = {
    "sd3": [("sd35m_rtx4090 (residual, train batch 2, aesthetic)", "sd35m_rtx4090", [], 23.6, (8, 9)),
            ("sd35m_rtx4090, PickScore reward", "sd35m_rtx4090", ["reward.name=pickscore"], 23.6, (8, 9)),
            ("sd35m_rtx4090 no-flow (`model.no_flow=true memory.input_grad_chunk=1`)", "sd35m_rtx4090",
             ["model.no_flow=true", "memory.input_grad_chunk=1"], 15.8, (8, 9)),
            ("sd35m_a100x8 (per GPU, ZeRO-2)", "sd35m_a100x8", [], 79.2, (8, 0))],
    "sdxl": [("sdxl_rtx4090 (residual, train batch 4)", "sdxl_rtx4090", [], 23.6, (8, 9)),
             ("sdxl_rtx4090 no-flow (`model.no_flow=true memory.input_grad_chunk=1`)", "sdxl_rtx4090",
              ["model.no_flow=true", "memory.input_grad_chunk=1"], 15.8, (8, 9)),
             ("sdxl_a100x8 (per GPU)", "sdxl_a100x8", [], 79.2, (8, 0))],
}


def rows(family: str, verbose: bool = False) -> str:
    lines = ["| configuration | card (GiB) | predicted peak (GiB), phase | needed with headroom (GiB) | fits | "
             "est. work vs the fastest configuration ignoring memory |",
             "| --- | ---: | --- | ---: | :---: | ---: |"]
    for label, preset, extra, vram, cap in TARGETS[family]:
        cfg = load_config(preset, extra)
        profile = planner.Probes(cfg, verbose=verbose)
        pred = planner.predict(cfg, profile, cap)
        fastest = planner.propose(cfg, profile, 1e6, capability=cap)
        ratio = pred.tflop_per_update / fastest.prediction.tflop_per_update
        lines.append(f"| {label} | {vram:g} | {pred.peak / GiB:.2f}, {pred.peak_phase} | {pred.required_gib():.2f} | "
                     f"{'yes' if pred.fits(vram) else 'no'} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(TARGETS), default="sd3")
    ap.add_argument("--verbose", action="store_true", help="report each probe traced")
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()
    table = rows(args.family, args.verbose)
    print(table)
    if not args.no_results:
        append_results(f"Planner: the {args.family} presets on their cards (predicted)", " ".join(["python"] + sys.argv),
                       table, "See benchmarks/plan_presets.py for the definitions; predictions, not GPU measurements.")


if __name__ == "__main__":
    main()
