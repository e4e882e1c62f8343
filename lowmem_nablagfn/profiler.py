"""``lowmem-nablagfn profile``: run a few updates of a configuration and report, per phase, peak
memory, time and throughput.

A *round* is what :func:`~lowmem_nablagfn.trainer.train` does per epoch, cut to one optimiser update:
sample (encode, sampling, final reward) while holding the previous round's samples (the official
one-epoch lag), then one update on them (reward-gradient passes, reference pass, training pass,
optimiser).  One unrecorded warm-up round comes first (optimiser state, allocator caches), then
``updates`` recorded rounds.  The phases are the ``memtrack.phase`` marks placed in
:mod:`~lowmem_nablagfn.memory` and :mod:`~lowmem_nablagfn.trainer`; on CUDA their peaks come from the
allocator (``max_memory_allocated``, reset at each phase boundary), on the CPU from a
:class:`~lowmem_nablagfn.memtrack.LiveBytes` tracker that starts from the bytes of every model,
optimiser state and stored sample.  A phase's peak is the whole process's live total, not the
phase's own increment.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import memtrack, results
from .config import Config, to_dict
from .memtrack import GiB
from .sampling import Conditioning, as_conditioning

PHASES = ("encode", "sampling", "final_reward", "reward_grad_next", "reward_grad_cur", "reference", "policy",
          "train", "optimizer")


def _tensors(c, data) -> List[torch.Tensor]:
    """Everything the run holds before recording starts: models, optimiser state, samples."""
    out: List[torch.Tensor] = []
    for module in (c.parts.unet, c.parts.vae, *c.parts.text_encoders, c.flow_model, c.reward_model):
        if module is not None:
            out += list(module.parameters()) + list(module.buffers())
            out += [p.grad for p in module.parameters() if p.grad is not None]
    opt = c.optimizer
    if opt is not None:
        for state in opt.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    out += as_conditioning(c.uncond).tensors()  # SDXL: a Conditioning (pooled embeddings, time ids)
    if data is not None:
        for v in data.state_dict().values():
            out += [v] if isinstance(v, torch.Tensor) else v.tensors() if isinstance(v, Conditioning) else []
    return out


def run_profile(cfg: Config, updates: int = 2, warmup: int = 1, trace_dir: Optional[Path] = None,
                components=None) -> dict:
    """Warm up, then record ``updates`` rounds; returns the per-phase statistics and throughputs.

    ``components``: already built :class:`~lowmem_nablagfn.trainer.Components` of ``cfg`` (several
    measurements sharing one model load: benchmarks/gpu_validate.py); default: ``trainer.setup(cfg)``."""
    from . import trainer as T
    from .sampling import Trajectories

    c = T.setup(cfg) if components is None else components
    t = cfg.training
    per_update = t.batch_size * t.gradient_accumulation_steps
    lag = not t.on_policy
    epoch = [0]

    def sample_round():
        parts, n = [], 0
        while n < per_update:  # enough trajectories for one update, whatever the epoch size
            parts.append(T.sample_epoch(c, epoch[0]))
            epoch[0] += 1
            n += parts[-1].batch_size
        data = Trajectories.cat(parts)
        return data.select(torch.arange(per_update)) if data.batch_size > per_update else data

    def one_round(buffer):
        with memtrack.phase("round_sample"):
            fresh = sample_round()
        data = buffer if lag else fresh
        with memtrack.phase("round_update"):
            T.train_epoch(c, data, epoch[0])
        return fresh

    t0 = time.perf_counter()
    buffer = sample_round() if lag else None
    for _ in range(warmup):
        buffer = one_round(buffer)
    warm_s = time.perf_counter() - t0
    prof = None
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if c.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=acts)
    with memtrack.recording(c.device, existing=_tensors(c, buffer), emit_ranges=prof is not None) as rec:
        start_bytes = rec.source.current
        if prof is not None:
            prof.__enter__()
        try:
            for _ in range(updates):
                buffer = one_round(buffer)
        finally:
            if prof is not None:
                prof.__exit__(None, None, None)
        overall = rec.overall_peak()
        reserved = rec.overall_reserved()
    trace_file = None
    if prof is not None:
        trace_file = str(trace_dir / "trace.json")
        prof.export_chrome_trace(trace_file)

    ph = rec.phases
    sample_s = sum(ph[n].seconds for n in ("encode", "sampling", "final_reward") if n in ph)
    update_s = ph["round_update"].seconds
    images = ph["sampling"].items if "sampling" in ph else 0
    transitions = ph["train"].items if "train" in ph else 0
    summary = {
        "device": str(c.device), "machine": results.machine(threads=True), "updates": updates, "warmup_s": warm_s,
        "peak_gib": overall / GiB, "start_gib": start_bytes / GiB,
        "reserved_peak_gib": None if reserved is None else reserved / GiB,
        "images_per_s": images / sample_s if sample_s else None,
        "transitions_per_s": transitions / update_s if update_s else None,
        "s_per_update": update_s / updates, "sample_s_per_round": ph["round_sample"].seconds / updates,
        "memory_source": "torch.cuda.max_memory_allocated" if c.device.type == "cuda" else "memtrack.LiveBytes",
        "trace": trace_file,
    }
    return {"summary": summary, "phases": {n: s.as_dict() for n, s in ph.items()}, "config": to_dict(cfg)}


def phase_table(result: dict, predicted: Optional[Dict[str, float]] = None) -> str:
    """Markdown table of the phases (and the planner's prediction next to each peak)."""
    head = "| phase | calls | s / call | total s | peak (GiB) | throughput |"
    sep = "| --- | ---: | ---: | ---: | ---: | --- |"
    if predicted is not None:
        head += " predicted (GiB) | error |"
        sep += " ---: | ---: |"
    lines = [head, sep]
    ph = result["phases"]
    for name in PHASES + ("round_sample", "round_update"):
        if name not in ph:
            continue
        s = ph[name]
        thr = ""
        if name == "sampling" and s["items"]:
            thr = f"{s['items'] / s['seconds']:.3g} images/s"
        elif name == "train" and s["items"]:
            thr = f"{s['items'] / ph['round_update']['seconds']:.3g} transitions/s (whole update)"
        row = (f"| {name} | {s['calls']} | {s['seconds'] / max(1, s['calls']):.3f} | {s['seconds']:.2f} | "
               f"{s['peak_gib']:.3f} | {thr} |")
        if predicted is not None:
            p = predicted.get(name)
            row += (f" {p:.3f} | {p / s['peak_gib'] - 1:+.1%} |" if p and s["peak_gib"] else " – | – |")
        lines.append(row)
    return "\n".join(lines)


def summary_line(result: dict) -> str:
    s = result["summary"]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    return (f"peak {s['peak_gib']:.3f} GiB ({s['memory_source']}); {fmt(s['images_per_s'], '.3g')} images/s "
            f"sampling; {fmt(s['transitions_per_s'], '.3g')} transitions/s and {s['s_per_update']:.2f} s "
            f"per update ({s['updates']} recorded after warm-up); device {s['device']}")


def main(cfg: Config, args) -> int:
    """The CLI subcommand (see :mod:`lowmem_nablagfn.cli`)."""
    import sys

    result = run_profile(cfg, updates=args.updates, warmup=args.warmup,
                         trace_dir=Path(args.trace) if args.trace else None)
    predicted = None
    if args.compare_plan:
        from .planner import Profile, predict

        pred = predict(cfg, Profile(cfg))
        predicted = {k: v / GiB for k, v in pred.phases.items()}
        result["predicted_gib"] = predicted
        result["predicted_peak_gib"] = pred.peak / GiB
    table = phase_table(result, predicted)
    line = summary_line(result)
    if predicted is not None:
        line += f"; planner's predicted peak {result['predicted_peak_gib']:.3f} GiB"
    print(table)
    print(line)
    out = Path(args.json) if args.json else Path(cfg.logging.output_dir) / cfg.logging.run_name / "profile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"profile written to {out}")
    if not args.no_results:
        path = Path(args.results) if args.results else results.RESULTS
        if path.parent.is_dir():
            command = "lowmem-nablagfn " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
            results.append_results(path, f"Profile: {args.preset}", command, table, line, threads=True)
            print(f"appended to {path}")
    return 0


__all__ = ["main", "phase_table", "run_profile", "summary_line"]
