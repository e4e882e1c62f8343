"""The probes of one architecture (its traced profile): probe results, traced on demand, kept on disk.

A :class:`Probes` holds every probe result of one :func:`~.meta.arch_key` (1- and 2-row traces of each
probe and checkpointing flag set) and gives any row count by linear interpolation.  Results are read
from the traces shipped with the package (:data:`SHIPPED`), then from the user cache
(:func:`cache_dir`); a missing probe is traced (:class:`~.trace.Tracer`) and saved.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

from ..config import Config
from .meta import arch_key, build_meta, key_hash, static_sizes
from .trace import Tracer

#: Traces shipped with the package (named by :func:`~.meta.key_hash`).
SHIPPED = Path(__file__).resolve().parent.parent / "planner_profiles"


def cache_dir() -> Path:
    return Path(os.environ.get("LOWMEM_NABLAGFN_CACHE", Path.home() / ".cache" / "lowmem_nablagfn")) / "planner"


class MissingProbe(LookupError):
    """A probe is not in the cached profile and tracing was not allowed."""


class Probes:
    """Probe results of one architecture (``arch_key``), traced on demand, cached on disk.

    Args:
        cfg: any configuration of the architecture (memory knobs and batch sizes do not matter).
        verbose: report each probe traced (to stderr).
        cache: read and write the cache directory (the shipped profiles are read either way).
        allow_trace: trace missing probes (else raise :class:`MissingProbe`).
    """

    def __init__(self, cfg: Config, verbose: bool = False, cache: bool = True, allow_trace: bool = True):
        self.cfg = cfg
        self.models = build_meta(cfg)
        self.key = arch_key(cfg, self.models)
        self.static = static_sizes(cfg, self.models)
        self.hash = key_hash(self.key)
        self.verbose, self.cache, self.allow_trace = verbose, cache, allow_trace
        self._memo: Dict[tuple, Dict[str, float]] = {}
        self.path = cache_dir() / f"{self.hash}.json"
        self.data: Dict[str, Dict[str, float]] = {}
        for path in (SHIPPED / f"{self.hash}.json", self.path):
            if path.is_file() and (cache or path.parent == SHIPPED):
                stored = json.loads(path.read_text())
                if stored.get("key") == json.loads(json.dumps(self.key, default=str)):
                    self.data.update(stored["probes"])
        self._tracer: Optional[Tracer] = None

    @property
    def source(self) -> str:
        return self.models.source

    def _trace(self, name: str, flags: dict, r: int) -> Dict[str, float]:
        if self._tracer is None:
            self._tracer = Tracer(self.cfg, self.models)
        if self.verbose:
            import sys
            import time

            t0 = time.perf_counter()
            out = self._tracer.probe(name, flags, r)
            print(f"  traced {name} {flags} rows={r}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            return out
        return self._tracer.probe(name, flags, r)

    def get(self, name: str, flags: Optional[dict] = None, rows: float = 1.0) -> Dict[str, float]:
        """Every quantity of probe ``name`` at ``rows`` (linear in rows through the 1- and 2-row traces)."""
        flags = {k: bool(v) for k, v in sorted((flags or {}).items())}
        tag = name + "".join(f"|{k}" for k, v in flags.items() if v)
        memo = (tag, float(rows))
        if memo in self._memo:
            return self._memo[memo]
        points = []
        for r in (1, 2):
            k = f"{tag}|r={r}"
            if k not in self.data:
                if not self.allow_trace:
                    raise MissingProbe(k)
                self.data[k] = self._trace(name, flags, r)
                self.save()
            points.append(self.data[k])
        out = {q: max(0.0, points[0][q] + (points[1][q] - points[0][q]) * (rows - 1)) for q in points[0]}
        self._memo[memo] = out
        return out

    def save(self, path: Optional[Path] = None) -> Path:
        path = path or self.path
        if not self.cache and path == self.path:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks of one job may write at once
        tmp.write_text(json.dumps({"key": self.key, "probes": self.data}, indent=1, sort_keys=True, default=str))
        tmp.replace(path)
        return path

