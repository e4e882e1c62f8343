"""Recording measurements: the machine's description and dated sections of a ``RESULTS.md`` (one format
for the ``profile`` command and the scripts in ``benchmarks/``).

Results are written where the user runs — ``./benchmarks/RESULTS.md`` when the current directory has a
``benchmarks/`` (a checkout of this repository), or a path given explicitly (``profile --results``; the
benchmark scripts pass their own directory's file) — never inside the installed package."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Optional, Union

import torch


def default_results(cwd: Optional[Path] = None) -> Optional[Path]:
    """``benchmarks/RESULTS.md`` under ``cwd`` (default: the current directory) when that directory
    has a ``benchmarks/``, else None (nothing is appended)."""
    bench = (Path.cwd() if cwd is None else Path(cwd)) / "benchmarks"
    return bench / "RESULTS.md" if bench.is_dir() else None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """1-minute load average (NaN where the OS has none): CPU timings on a shared machine move with it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine(threads: bool = False) -> str:
    """``"<GPU name>; torch X"`` or ``"CPU <model>, N cores[, T threads]; torch X"``."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"CPU {cpu_name()}, {os.cpu_count()} cores"
        if threads:
            dev += f", {torch.get_num_threads()} threads"
    return f"{dev}; torch {torch.__version__}"


def append_results(path: Union[str, Path], title: str, command: str, table: str, notes: str = "",
                   threads: bool = False) -> None:
    """Append one dated section (never rewrites: several scripts share the file)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"\n## {title} — {stamp}\n\nCommand: `{command}`\n\nMachine: {machine(threads)}\n\n{table}\n"
    if notes:
        text += f"\n{notes}\n"
    with open(path, "a") as f:
        f.write(text)
