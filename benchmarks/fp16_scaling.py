"""fp16 (V100) against bf16 on the default job: updates lost to the loss-scale search, reward per epoch.

    python benchmarks/fp16_scaling.py [--out DIR] [--append] [key=value ...]
    python benchmarks/fp16_scaling.py --runs before=/tmp/fp16runs/before_fp16 bf16=/tmp/fp16runs/before_bf16

Trains ``lowmem-nablagfn train --preset tiny_cpu training.mixed_precision=fp16`` and the same with bf16
through the real CLI (or, with ``--runs``, reads runs already made: ``NAME=RUN_DIR``), then prints one
table: per epoch, each run's reward mean, updates lost (the epoch's updates minus its optimiser steps)
and, where logged, passes rerun at a lower loss scale.  ``--append`` appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from lowmem_nablagfn.config import load_config  # noqa: E402
from lowmem_nablagfn.loop import updates_per_epoch  # noqa: E402

PRECISIONS = ("fp16", "bf16")


def train(out: Path, precision: str, overrides: List[str]) -> Path:
    """One run of the default job in ``precision``, in a new run directory under ``out``."""
    name = f"{precision}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "lowmem_nablagfn.cli", "train", "--preset", "tiny_cpu", "--quiet",
           f"training.mixed_precision={precision}", f"logging.output_dir={out}", f"logging.run_name={name}",
           *overrides]
    subprocess.run(cmd, check=True)
    return out / name


def epochs(run: Path) -> List[dict]:
    """Rows of ``metrics.jsonl`` that trained (epoch ≥ 0), with ``lost``: updates without a step."""
    cfg = json.loads((run / "config.json").read_text())
    per_epoch = updates_per_epoch(load_config("tiny_cpu", [f"sampling.batch_size={cfg['sampling']['batch_size']}",
                                                           f"training.batch_size={cfg['training']['batch_size']}"]))
    rows, steps = [], 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["epoch"] < 0:
            continue
        r["lost"] = per_epoch - (r["optimizer_steps"] - steps)
        steps = r["optimizer_steps"]
        rows.append(r)
    return rows


def table(runs: Dict[str, Path]) -> str:
    data = {name: epochs(run) for name, run in runs.items()}
    head = ["epoch"] + [f"{name}: reward / lost / reruns" for name in data]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for e in range(max(len(rows) for rows in data.values())):
        cells = [str(e)]
        for rows in data.values():
            if e >= len(rows):
                cells.append("")
                continue
            r = rows[e]
            reruns = r.get("train/scale_retries")
            cells.append(f"{r['reward/mean']:.3f} / {r['lost']} / {'-' if reruns is None else int(reruns)}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| total lost | " + " | ".join(str(sum(r["lost"] for r in rows)) for rows in data.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/lowmem_bench/fp16_scaling"))
    ap.add_argument("--runs", nargs="+", metavar="NAME=RUN_DIR", help="tabulate these runs instead of training")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("overrides", nargs="*", help="key=value for both runs")
    args = ap.parse_args()
    if args.runs:
        runs = {}
        for item in args.runs:
            name, sep, path = item.partition("=")
            if not sep or not (Path(path) / "metrics.jsonl").is_file():
                ap.error(f"--runs {item!r}: expected NAME=RUN_DIR with a metrics.jsonl in RUN_DIR")
            runs[name] = Path(path)
    else:
        runs = {p: train(args.out, p, args.overrides) for p in PRECISIONS}
    text = table(runs)
    print(text)
    if args.append:
        command = "python benchmarks/fp16_scaling.py " + " ".join(sys.argv[1:])
        append_results("fp16 loss-scale search on the default job (tiny_cpu)", command, text,
                       "lost = updates of the epoch without an optimiser step; reruns = passes "
                       "run again at a lower loss scale (train/scale_retries)")


if __name__ == "__main__":
    main()
