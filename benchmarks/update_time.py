"""Time one training update of a preset (default: the tiny model), median of several.

    python benchmarks/update_time.py [--preset tiny_cpu] [--repeats 5] [key=value ...]

Warm-up first, CUDA-synchronised timings, prints a table and appends it to benchmarks/RESULTS.md.
One update = all batches of one optimiser step (training.batch_size x accumulation trajectories,
K+1 transitions each), the official schedule (the baseline of the ratios: the planner's one definition,
``planner.OFFICIAL_OVERRIDES`` — the official order and graphs with every memory knob off, not just
``memory.mode=official`` over the preset's checkpointing) and the preset's own schedule side by side.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, machine  # noqa: E402

from lowmem_nablagfn import loop as T  # noqa: E402
from lowmem_nablagfn.config import load_config  # noqa: E402
from lowmem_nablagfn.planner import OFFICIAL_OVERRIDES  # noqa: E402


def time_update(cfg, repeats: int) -> float:
    c = T.setup(cfg)
    data = T.sample_epoch(c, 0)
    per_update = cfg.training.batch_size * cfg.training.gradient_accumulation_steps
    sub = data.select(torch.arange(per_update))
    times = []
    for i in range(repeats + 1):
        if c.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        T.train_epoch(c, sub, i)
        if c.device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny_cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    for no_flow in (False, True):
        for schedule, memory in (("official", OFFICIAL_OVERRIDES), (f"{args.preset} as configured", [])):
            cfg = load_config(args.preset, ["logging.sample_grid_seeds=0", "logging.tensorboard=false",
                                            "logging.output_dir=/tmp/lowmem_bench", f"model.no_flow={no_flow}",
                                            *args.overrides, *memory])
            rows.append(("no-flow" if no_flow else "residual", schedule, time_update(cfg, args.repeats)))
    lines = ["| objective | memory schedule | s / update (median) | vs official |", "| --- | --- | --- | --- |"]
    for obj, mode, s in rows:
        base = next(r[2] for r in rows if r[0] == obj and r[1] == "official")
        lines.append(f"| {obj} | {mode} | {s:.3f} | {s / base:.2f}x |")
    table = "\n".join(lines)
    print(table)
    append_results("One training update", " ".join(sys.argv), table,
                   f"preset {args.preset}, {args.repeats} repeats after one warm-up; {machine()}")


if __name__ == "__main__":
    main()
