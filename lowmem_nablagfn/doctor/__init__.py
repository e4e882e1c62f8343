"""``lowmem-nablagfn doctor``: what this machine can run, checked before a multi-hour run.

One row per check (:class:`Check`): ``ok``, ``warn`` (runs, but slower or with a feature off),
``fail`` (a run that needs it would break; the row says the fix) or ``skip`` (cannot be checked here,
e.g. the GPU checks on a machine without CUDA).  Every check is a small function of the configuration
(:data:`CHECKS`); :func:`run_checks` runs them all, a check that raises becomes a ``fail`` row, so one
broken package never hides the rest.  The command exits 0 when no row fails, 1 otherwise.

    lowmem-nablagfn doctor                          # the machine
    lowmem-nablagfn doctor --preset sd15_rtx4090    # ... and that preset's files and the planner's verdict

Modules: :mod:`.rows` (statuses, :class:`Check`), :mod:`.software` (torch, dependencies, DeepSpeed,
disk), :mod:`.gpu` (CUDA, cards, NCCL, kernel, 8-bit AdamW, attention), :mod:`.preset` (files, plan).

The GPU checks run real work on every visible device: the fused Triton subsampling kernel against the
PyTorch reference (bit for bit, :mod:`.subsample`), one 8-bit AdamW step (bitsandbytes), each SDPA
backend and xformers forward and backward, and a two-rank NCCL all-reduce through the trainer's own
process-group set-up when two or more GPUs are visible.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from .gpu import check_adamw8bit, check_attention, check_cuda, check_gpus, check_nccl, check_triton_kernel
from .preset import check_files, check_plan
from .rows import (BF16_CAPABILITY, DISK_FAIL_GIB, DISK_WARN_GIB, FAIL, NCCL_TIMEOUT_S, NO_CUDA, OK,  # noqa: F401
                   SKIP, WARN, Check, GiB)
from .software import (check_dependencies, check_deepspeed, check_disk, check_torch,  # noqa: F401
                       declared_requirements, package_problem)


#: Every check, in the table's order: each a function of the configuration returning its rows.
CHECKS: Tuple[Callable, ...] = (check_torch, check_dependencies, check_cuda, check_gpus, check_nccl,
                                 check_triton_kernel, check_adamw8bit, check_attention, check_deepspeed,
                                 check_disk)
#: Run only with ``--preset``: the preset's files and the planner's verdict.
PRESET_CHECKS: Tuple[Callable, ...] = (check_files, check_plan)


def run_checks(cfg, preset_checks: bool = False,
               checks: Optional[Iterable[Callable]] = None) -> List[Check]:
    """Every row of :data:`CHECKS` (and :data:`PRESET_CHECKS`); a check that raises is a ``fail`` row
    naming the error, and the others still run."""
    out: List[Check] = []
    for check in checks if checks is not None else CHECKS + (PRESET_CHECKS if preset_checks else ()):
        try:
            out += check(cfg)
        except Exception as exc:  # noqa: BLE001 - reported as the check's failure, the rest still run
            name = check.__name__.replace("check_", "")
            out.append(Check(name, FAIL, f"the check raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                             "see the error; rerun with the package it names fixed"))
    return out


def format_table(rows: Sequence[Check]) -> str:
    """One line per check: status, name, detail and (unless ok) the fix."""
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'':4}  {'check':<{width}}  detail", f"{'':4}  {'-' * width}  {'-' * 6}"]
    for r in rows:
        fix = f"  -> fix: {r.fix}" if r.fix and r.status != OK else ""
        lines.append(f"{r.status:<4}  {r.name:<{width}}  {r.detail}{fix}")
    counts = {s: sum(r.status == s for r in rows) for s in (OK, WARN, FAIL, SKIP)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + (
        "" if counts[FAIL] else ": nothing fails"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the subcommand

def add_parser(subparsers) -> None:
    """``lowmem-nablagfn doctor``: its flags (see :mod:`lowmem_nablagfn.cli` for the contract).  No
    ``reads_config``: the CLI's set-up checks would stop at a missing model file, which is a row here."""
    p = subparsers.add_parser("doctor", help="check this machine (torch, CUDA, GPUs, NCCL, kernels, packages, "
                                             "disk) before a long run; with --preset, its files and fit")
    p.add_argument("--preset", "-p", default=None, help="also check this preset's files and the planner's verdict")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the preset")


def run(args) -> int:
    """Print the table; 0 when nothing fails, 1 otherwise, 2 for a configuration that does not load."""
    from ..config import ConfigError, load_config

    try:
        cfg = load_config(args.preset, list(args.overrides or []))
    except ConfigError as exc:
        print(f"lowmem-nablagfn doctor: {exc}", file=sys.stderr)
        return 2
    rows = run_checks(cfg, preset_checks=args.preset is not None)
    print(format_table(rows), flush=True)
    return 1 if any(r.status == FAIL for r in rows) else 0
