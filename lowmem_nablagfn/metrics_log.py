"""Reading a run's ``metrics.jsonl`` (one JSON row per epoch, written by the trainer's logger): the
report, the run summary and the reward-hacking monitor read it the same way."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List


def read_metrics(path: Path) -> List[dict]:
    """Rows of ``metrics.jsonl``; a partly written last line is skipped; a resumed run's repeated
    epochs keep their latest row."""
    rows: Dict[int, dict] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "epoch" in row:
            rows[int(row["epoch"])] = row
    return [rows[k] for k in sorted(rows)]
