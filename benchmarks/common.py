"""Shared by the benchmark scripts: machine description and appending to RESULTS.md."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        dev = f"CPU {cpu}, {os.cpu_count()} cores"
    return f"{dev}; torch {torch.__version__}"


def append_results(title: str, command: str, table: str, notes: str = "") -> None:
    """Append one dated section (never rewrite: several scripts share the file)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"\n## {title} — {stamp}\n\nCommand: `{command}`\n\nMachine: {machine()}\n\n{table}\n"
    if notes:
        text += f"\n{notes}\n"
    with open(RESULTS, "a") as f:
        f.write(text)
