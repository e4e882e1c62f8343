"""Recording measurements: the machine's description and dated sections of ``benchmarks/RESULTS.md``
(one format for the ``profile`` command and the scripts in ``benchmarks/``)."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Union

import torch

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"


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
