"""The paper's prompt sets, shipped as package data, and user prompt files.

| set | used with | split |
| --- | --- | --- |
| simple_animals | aesthetic score | all prompts train and evaluate |
| hpd_photo_painting | HPSv2 | per style (photo, paintings) the first 10 are held out for eval |
| drawbench | ImageReward | all |
| imagenet | optional | all |

A user file holds one prompt a line, or a JSON list of strings.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List

DATA = Path(__file__).resolve().parent / "data"
BUILTIN_SETS = ("simple_animals", "hpd_photo_painting", "drawbench", "imagenet")
HELD_OUT_PER_STYLE = 10


def known_prompt_set(name: str) -> bool:
    return name in BUILTIN_SETS or Path(name).expanduser().is_file()


def _lines(path: Path) -> List[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_prompt_file(path: str | Path) -> List[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found; give one prompt a line or a JSON list")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        prompts = list(data) if isinstance(data, (list, dict)) else []
    elif path.suffix == ".csv":
        with path.open() as f:
            prompts = [row[0] for row in list(csv.reader(f))[1:] if row]
    else:
        prompts = _lines(path)
    prompts = [str(p).strip() for p in prompts if str(p).strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def load_prompts(name: str, split: str = "train") -> List[str]:
    """Prompts of a built-in set (``split`` = ``train`` | ``eval``) or of a user file."""
    if name == "simple_animals":
        return _lines(DATA / "simple_animals.txt")
    if name == "hpd_photo_painting":
        out = []
        for style in ("photo", "paintings"):
            prompts = json.loads((DATA / f"benchmark_{style}.json").read_text())
            out += prompts[:HELD_OUT_PER_STYLE] if split == "eval" else prompts[HELD_OUT_PER_STYLE:]
        return out
    if name == "drawbench":
        return read_prompt_file(DATA / "DrawBench_Prompts.csv")
    if name == "imagenet":
        return [line.split(",")[0].strip() for line in _lines(DATA / "imagenet_classes.txt")]
    return read_prompt_file(name)
