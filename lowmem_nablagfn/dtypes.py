"""Dtype names, in one map: every config field and CLI flag that names a dtype reads it here
(``training.mixed_precision``, ``reward.weight_dtype``, ``memory.transition_dtype``, ``export --dtype``).

``no`` is ``training.mixed_precision``'s name for full precision (as accelerate spells it).
Which names a field accepts is the config's validation; this module only says what a name means.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

#: dtype name -> torch dtype
DTYPES = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the names of a storage dtype (a file's weights, a frozen model's storage)
STORAGE_DTYPES = ("fp32", "bf16", "fp16")


def to_dtype(name: str, choices: Optional[Iterable[str]] = None) -> torch.dtype:
    """The torch dtype of ``name``; ``ValueError`` naming the accepted names when ``name`` is not one
    of ``choices`` (default: every name of :data:`DTYPES`)."""
    choices = tuple(DTYPES if choices is None else choices)
    if name not in choices:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(choices)}")
    return DTYPES[name]
