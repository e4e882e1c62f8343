"""The rows of ``lowmem-nablagfn doctor``: statuses, thresholds, :class:`Check`."""
from __future__ import annotations

from dataclasses import dataclass

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
#: The detail of every GPU check on a machine without one.
NO_CUDA = "cannot check (no CUDA device)"
#: bf16 tensor cores (and bf16 fused attention, :func:`.planner.gpu.sdpa_kernel`) start with Ampere.
BF16_CAPABILITY = (8, 0)
#: Free disk under ``logging.output_dir``: below FAIL_GIB a run cannot keep its checkpoints and
#: samples; below WARN_GIB a long one may not.
DISK_FAIL_GIB, DISK_WARN_GIB = 1.0, 10.0
#: How long the two-rank NCCL all-reduce may take, start-up included (seconds).
NCCL_TIMEOUT_S = 120.0
GiB = 2**30


@dataclass(frozen=True)
class Check:
    """One row of the table: ``status`` is one of ``ok``, ``warn``, ``fail``, ``skip``; ``fix`` says
    what to do when it is not ``ok``."""
    name: str
    status: str
    detail: str
    fix: str = ""
