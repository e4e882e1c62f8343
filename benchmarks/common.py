"""Shared by the benchmark scripts: machine description and appending to RESULTS.md
(``lowmem_nablagfn.results``, which the ``profile`` command uses too)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lowmem_nablagfn.results import machine  # noqa: E402,F401  (re-exported)
from lowmem_nablagfn import results as _results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"  # this repository's, whatever the current directory


def append_results(title: str, command: str, table: str, notes: str = "") -> None:
    """Append one dated section to benchmarks/RESULTS.md."""
    _results.append_results(RESULTS, title, command, table, notes)
