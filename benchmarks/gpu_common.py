"""What the GPU validation's parts share (benchmarks/gpu_validate.py, benchmarks/gpu_sd3.py): the smoke
workload, the wall-clock budget and its alarm, one measured round, one measured target's guard, and the
table cells of errors and relative errors.  Only torch and the standard library at import."""
from __future__ import annotations

import contextlib
import gc
import signal
import time
from typing import Optional

import torch

#: The smoke run's workload (the tiny model on the CPU): (preset, overrides).
SMOKE_BASE = ("tiny_cpu", ["sampling.num_steps=5", "sampling.batch_size=4", "sampling.num_batches_per_epoch=1",
                           "training.batch_size=4", "training.gradient_accumulation_steps=1",
                           "training.on_policy=true", "device=cpu"])
QUIET = ["logging.tensorboard=false", "logging.sample_grid_seeds=0", "logging.quiet=true"]


class OutOfTime(BaseException):
    """The part's budget ran out inside a section (raised by the alarm of :func:`deadline`; a
    BaseException so that no ``except Exception`` on the way swallows it)."""


class Budget:
    """Wall-clock budget: sections and measurements past it are skipped with a note."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


@contextlib.contextmanager
def deadline(budget: Budget):
    """Raise :class:`OutOfTime` in this thread when ``budget`` runs out (a SIGALRM timer), so that a
    long measurement cannot carry the part past its time; nothing where there is no SIGALRM or off
    the main thread (then only the checks between measurements hold the budget)."""
    import threading

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise OutOfTime(f"stopped at the part's time budget ({budget.seconds:.0f} s)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(budget.left(), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def measure(c, cfg, warmup: int) -> dict:
    """One recorded round (sample, then one update) of ``cfg`` on the components ``c``."""
    from lowmem_nablagfn import profiler

    gc.collect()
    if c.device.type == "cuda":
        torch.cuda.empty_cache()  # the previous configuration's cached segments would count as reserved
    res = profiler.run_profile(cfg, updates=1, warmup=warmup, components=c)
    s = res["summary"]
    return {"peak_gib": s["peak_gib"], "reserved_gib": s["reserved_peak_gib"], "s_per_update": s["s_per_update"],
            "sample_s": s["sample_s_per_round"],
            "phases_gib": {n: p["peak_gib"] for n, p in res["phases"].items() if not n.startswith("round_")}}


@contextlib.contextmanager
def measured_target(row: dict):
    """One target's set-up and measurement (sections 5 and 6): an OOM or an error becomes the row's
    ``skipped`` and the next target runs (the budget's :class:`OutOfTime` goes through); the components the
    block keeps in ``held["c"]`` are released and the CUDA cache emptied after it, whatever happened."""
    held: dict = {}
    try:
        yield held
    except torch.cuda.OutOfMemoryError as exc:
        row["skipped"] = f"OOM: {str(exc).splitlines()[0]}"
    except Exception as exc:  # noqa: BLE001 - reported; the next target runs
        row["skipped"] = _error(exc)
    finally:
        held.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _error(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for a table cell."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _pct(measured: Optional[float], predicted: Optional[float]) -> str:
    return "–" if not measured or predicted is None else f"{predicted / measured - 1:+.1%}"
