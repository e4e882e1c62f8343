"""Memory and time of named phases, on CUDA (allocator statistics) and without a GPU (live tensor bytes).

Two pieces:

* :class:`LiveBytes` — a ``TorchDispatchMode`` that sees every tensor an aten op returns and keeps
  the byte count of each distinct *storage* alive (views and in-place results share a storage and
  count once), dropping it when the storage is freed (a weak-reference callback on the
  ``UntypedStorage``, whose Python object lives exactly as long as the storage).  ``current`` is the
  sum of live storages, ``peak`` its maximum.  It works on real tensors and under ``FakeTensorMode``
  (no memory, no compute: the planner traces full-size models this way), and, unlike
  ``torch.distributed._tools.mem_tracker``, with ``torch.autograd.grad`` and frozen modules (it hooks
  no module or parameter).  What it cannot see: memory a kernel allocates internally (cuBLAS/cuDNN
  workspaces, fused-attention scratch), allocator rounding and fragmentation, and tensors that never
  pass through an aten op while it is active (pre-existing ones are added with :meth:`register`
  or :meth:`register_all`).  So it measures what ``torch.cuda.max_memory_allocated`` measures up to
  workspaces and 512-byte rounding, not what ``nvidia-smi`` shows.
* :func:`phase` — ``with memtrack.phase("reward_grad"):`` marks a phase of the training step.  It is
  a no-op (one global lookup) unless a :class:`Recorder` is installed with :func:`recording`; then it
  records each phase's wall time (CUDA-synchronised), call count and peak memory — from the CUDA
  allocator when the device is a GPU, else from a :class:`LiveBytes` tracker.

Phases nest; a phase's peak includes its sub-phases'.  The peak is folded into every open phase at
each boundary, so resetting the allocator's peak counter for an inner phase loses nothing outside.
"""
from __future__ import annotations

import contextlib
import gc
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GiB = 2**30


def _storage_key(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages, counted at every aten op while the mode is active.

    Args:
        device_type: count only storages on this device type (``"cpu"``, ``"cuda"``); ``None``: all.
        new_only: do not count an op's output that is a view of one of its inputs' storages unless that
            storage is counted already (``t()`` of a weight, ``detach``…): with nothing registered, the
            count is then the bytes *created* inside the mode (activations, saved tensors, copies).

    Use as a context manager (``with LiveBytes() as mem: ...``); ``mem.peak`` / ``mem.current`` are
    bytes.  :meth:`reset_peak` starts a new peak window at the current level.
    """

    def __init__(self, device_type: Optional[str] = None, new_only: bool = False):
        super().__init__()
        self.device_type = device_type
        self.new_only = new_only
        self.live: Dict[int, int] = {}  # StorageImpl address -> bytes
        self._refs: Dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    # -- counting
    def _add(self, t: torch.Tensor) -> None:
        if self.device_type is not None and t.device.type != self.device_type:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / nested / functional wrappers
            return
        key = st._cdata
        nbytes = st.nbytes()
        old = self.live.get(key)
        if old is None:
            self._refs[key] = weakref.ref(st, self._release_cb(key))
        elif old == nbytes:
            return
        self.live[key] = nbytes
        self.current += nbytes - (old or 0)
        if self.current > self.peak:
            self.peak = self.current

    def _release_cb(self, key: int) -> Callable:
        me = weakref.ref(self)

        def release(_ref) -> None:
            tracker = me()
            if tracker is not None and tracker._refs.get(key) is _ref:
                tracker.current -= tracker.live.pop(key, 0)
                del tracker._refs[key]

        return release

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        if self.new_only:
            inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if inputs and _storage_key(t) in inputs and _storage_key(t) not in self.live:
                    continue
                self._add(t)
        return out

    # -- pre-existing tensors, windows
    def register(self, tensors: Iterable[torch.Tensor]) -> "LiveBytes":
        """Count tensors that exist already (weights, optimiser state, stored samples)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return self

    def register_modules(self, *modules: Optional[torch.nn.Module]) -> "LiveBytes":
        for m in modules:
            if m is not None:
                self.register(list(m.parameters()) + list(m.buffers()))
                self.register([p.grad for p in m.parameters() if p.grad is not None])
        return self

    def register_all(self) -> "LiveBytes":
        """Count every tensor the garbage collector can see (parameters, gradients, optimiser state…)."""
        self.register([o for o in gc.get_objects() if isinstance(o, torch.Tensor)])
        return self

    def reset_peak(self) -> int:
        """Start a new peak window at the current level; returns the old peak."""
        old, self.peak = self.peak, self.current
        return old


# ----------------------------------------------------------------------------- memory sources

class _CudaSource:
    """``torch.cuda`` allocator statistics of one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reserved_peak = torch.cuda.max_memory_reserved(device)
        """Largest ``max_memory_reserved`` over every window (the phase boundaries reset it)."""

    @property
    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    @property
    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> int:
        old = self.peak
        self.reserved_peak = max(self.reserved_peak, torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        return old

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------- phases

@dataclass
class PhaseStats:
    """Totals of one phase over all its calls."""

    name: str
    calls: int = 0
    seconds: float = 0.0
    peak_bytes: int = 0
    """Largest live total (all tensors, not only the phase's own) seen while the phase ran."""
    start_bytes: int = 0
    """Live total at the first entry (the phase's peak minus this is what the phase added)."""
    items: float = 0.0
    """Work items counted with :meth:`Recorder.count` (images, transitions)."""

    def as_dict(self) -> dict:
        return {"name": self.name, "calls": self.calls, "seconds": self.seconds,
                "peak_gib": self.peak_bytes / GiB, "start_gib": self.start_bytes / GiB, "items": self.items}


@dataclass
class _Open:
    name: str
    t0: float
    peak: int


@dataclass
class Recorder:
    """Per-phase time and peak memory; install with :func:`recording`.

    Args:
        device: the compute device; CUDA uses the allocator's counters, anything else needs ``live``.
        live: a :class:`LiveBytes` tracker that is active while the recorder is (CPU).
    """

    device: torch.device
    live: Optional[LiveBytes] = None
    emit_ranges: bool = False
    phases: Dict[str, PhaseStats] = field(default_factory=dict)
    _stack: List[_Open] = field(default_factory=list)

    def __post_init__(self):
        if self.device.type == "cuda":
            self.source = _CudaSource(self.device)
        elif self.live is not None:
            self.source = self.live
        else:
            raise ValueError("a Recorder on a non-CUDA device needs a LiveBytes tracker")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _fold(self) -> int:
        """Fold the peak since the last boundary into every open phase; start a new window."""
        peak = self.source.reset_peak()
        for frame in self._stack:
            frame.peak = max(frame.peak, peak)
        return peak

    def enter(self, name: str) -> None:
        self._sync()
        self._fold()
        stats = self.phases.setdefault(name, PhaseStats(name))
        if stats.calls == 0:
            stats.start_bytes = self.source.current
        self._stack.append(_Open(name, time.perf_counter(), self.source.current))

    def exit(self, name: str) -> None:
        self._sync()
        self._fold()
        frame = self._stack.pop()
        assert frame.name == name, (frame.name, name)
        stats = self.phases[name]
        stats.calls += 1
        stats.seconds += time.perf_counter() - frame.t0
        stats.peak_bytes = max(stats.peak_bytes, frame.peak)

    def count(self, name: str, items: float) -> None:
        self.phases.setdefault(name, PhaseStats(name)).items += items

    def overall_peak(self) -> int:
        self._fold()
        return max([s.peak_bytes for s in self.phases.values()] + [self.source.current])

    def overall_reserved(self) -> Optional[int]:
        """CUDA: the largest ``max_memory_reserved`` since recording began; None elsewhere."""
        self._fold()
        return getattr(self.source, "reserved_peak", None)


_ACTIVE: Optional[Recorder] = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a phase of the training step (a no-op unless a :class:`Recorder` is installed)."""
    rec = _ACTIVE
    if rec is None:
        yield
        return
    rec.enter(name)
    try:
        if rec.emit_ranges:
            with torch.profiler.record_function(name):
                yield
        else:
            yield
    finally:
        rec.exit(name)


def count(name: str, items: float) -> None:
    """Add work items (images, transitions) to a phase, for throughput; a no-op unless recording."""
    if _ACTIVE is not None:
        _ACTIVE.count(name, items)


def recording_active() -> bool:
    return _ACTIVE is not None


@contextlib.contextmanager
def recording(device: torch.device, existing: Optional[Iterable[torch.Tensor]] = None,
              scan: bool = False, emit_ranges: bool = False) -> Iterator[Recorder]:
    """Record phases on ``device``: CUDA allocator counters, or else a :class:`LiveBytes` tracker
    that starts by counting the ``existing`` tensors (weights, optimiser state, stored samples) or,
    with ``scan``, every tensor the garbage collector sees.  ``emit_ranges`` also marks each phase
    as a ``torch.profiler.record_function`` range (for a profiler trace)."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("memtrack.recording is already active")
    device = torch.device(device)
    live = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        stack = contextlib.nullcontext()
    else:
        live = LiveBytes(device_type=device.type)
        if scan:
            live.register_all()
        if existing is not None:
            live.register(existing)
        live.reset_peak()
        stack = live
    rec = Recorder(device, live, emit_ranges=emit_ranges)
    with stack:
        _ACTIVE = rec
        try:
            yield rec
        finally:
            _ACTIVE = None


@contextlib.contextmanager
def recording_with(live: LiveBytes) -> Iterator[Recorder]:
    """Record phases from a :class:`LiveBytes` tracker the caller has entered already (the planner
    traces the executor this way, under a ``FakeTensorMode``): each phase's peak is that tracker's."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("memtrack.recording is already active")
    rec = Recorder(torch.device("cpu"), live)
    _ACTIVE = rec
    try:
        yield rec
    finally:
        _ACTIVE = None


def peak_memory_gb(device: torch.device) -> float:
    """The process's peak memory so far in GiB: CUDA allocator peak on a GPU, else the peak resident
    set size (``ru_maxrss``, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


__all__ = ["GiB", "LiveBytes", "PhaseStats", "Recorder", "count", "peak_memory_gb", "phase", "recording",
           "recording_active", "recording_with"]
