"""``lowmem-nablagfn profile``: run a few updates of a configuration and report, per phase, peak
memory, time and throughput.

A *round* is one epoch of :func:`~lowmem_nablagfn.loop.run_epoch` — the body of the training loop
itself — with the fewest sampling batches that hold one optimiser update: sample (encode, sampling,
final reward) while holding the previous round's samples (the official one-epoch lag), then the
update(s) on them (the memory plan's phases, then the optimiser).  One unrecorded warm-up round comes
first (optimiser state, allocator caches), then ``updates`` recorded rounds.  The phases are the
``memtrack.phase`` marks of the memory plan's executor (:mod:`~lowmem_nablagfn.memory`) and of
:mod:`~lowmem_nablagfn.loop`; on CUDA their peaks come from the allocator (``max_memory_allocated``,
reset at each phase boundary), on the CPU from a :class:`~lowmem_nablagfn.memtrack.LiveBytes` tracker
that starts from the bytes of every model, optimiser state and stored sample.  A phase's peak is the
whole process's live total, not the phase's own increment.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import memtrack, results
from .config import Config, add_config_arguments, to_dict
from .memtrack import GiB
from .sampling import Conditioning, as_conditioning

def _tensors(c, data) -> List[torch.Tensor]:
    """Everything the run holds before recording starts: models, optimiser state, samples and, for
    SD 3.x, the cached prompt table.

    The table stands where the UNet families' text encoders stand: resident for the whole run, in host
    memory (:func:`~lowmem_nablagfn.models.family.load_run_parts`).  On the CPU it is part of the live
    total (the rows ``encode`` gathers from it are new tensors, counted as they are made; the CFG row
    ``c.uncond`` shares its storage with the table's, counted once); on CUDA the allocator does not see
    host memory, and ``existing`` is not read."""
    parts = c.parts
    out: List[torch.Tensor] = []
    for module in (parts.denoiser, parts.vae, *parts.text_encoders, c.flow_model, c.reward_model):
        if module is not None:
            out += list(module.parameters()) + list(module.buffers())
            out += [p.grad for p in module.parameters() if p.grad is not None]
    table = getattr(parts, "prompt_table", None)  # SD3Parts only (SDParts encode with their text encoders)
    if table is not None:
        out += table.table.tensors() + table.uncond.tensors()
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

    A round is one epoch of :func:`~lowmem_nablagfn.loop.run_epoch` — the training loop's own body —
    cut to the fewest sampling batches that hold one optimiser update (a sampling batch larger than
    an update trains all its trajectories: ``updates_per_round`` updates).
    ``components``: already built :class:`~lowmem_nablagfn.loop.Components` of ``cfg`` (several
    measurements sharing one model load: benchmarks/gpu_validate.py); default: ``loop.setup(cfg)``."""
    from . import loop

    cfg = one_update_per_epoch(cfg)
    if components is None:
        from .checks import setup_errors

        with setup_errors():  # one line, exit 2 (cli)
            components = loop.setup(cfg)
    c = components
    if c.cfg is not cfg:  # shared components: a copy with the round's epoch, the caller's left as it was
        from dataclasses import replace

        from .memory import build_plan

        c = replace(c, cfg=cfg, plan=build_plan(cfg))
    per_round = c.plan.batches.updates_per_epoch
    t0 = time.perf_counter()
    epoch = -1 if c.plan.batches.held_epochs == 2 else 0  # the lagged loop's first epoch only samples
    buffer = None
    if epoch < 0:  # the lagged loop's epoch -1 only samples
        buffer, _ = loop.run_epoch(c, epoch, None)
        epoch += 1

    def one_round(buf):
        nonlocal epoch
        fresh, _ = loop.run_epoch(c, epoch, buf)
        epoch += 1
        return fresh

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
        "device": str(c.device), "machine": results.machine(threads=True), "updates": updates,
        "updates_per_round": per_round, "warmup_s": warm_s,
        "peak_gib": overall / GiB, "start_gib": start_bytes / GiB,
        "reserved_peak_gib": None if reserved is None else reserved / GiB,
        "images_per_s": images / sample_s if sample_s else None,
        "transitions_per_s": transitions / update_s if update_s else None,
        "s_per_update": update_s / (updates * per_round), "sample_s_per_round": ph["round_sample"].seconds / updates,
        "memory_source": "torch.cuda.max_memory_allocated" if c.device.type == "cuda" else "memtrack.LiveBytes",
        "trace": trace_file,
    }
    return {"summary": summary, "phases": {n: s.as_dict() for n, s in ph.items()}, "config": to_dict(cfg),
            "phase_order": list(c.plan.phase_order)}


def one_update_per_epoch(cfg: Config) -> Config:
    """``cfg`` with the smallest epoch that still holds one optimiser update (profiling rounds)."""
    import copy

    from .memory import Batches

    b = Batches.of(cfg)
    per_update, s = b.trajectories_per_update, cfg.sampling
    if per_update % s.batch_size or b.trajectories_per_epoch <= per_update:
        return cfg
    out = copy.deepcopy(cfg)
    out.sampling.num_batches_per_epoch = per_update // s.batch_size
    return out


def measured_table(result: dict, predicted: Optional[Dict[str, float]] = None) -> str:
    """Markdown table of the phases (and the planner's prediction next to each peak)."""
    head = "| phase | calls | s / call | total s | peak (GiB) | throughput |"
    sep = "| --- | ---: | ---: | ---: | ---: | --- |"
    if predicted is not None:
        head += " predicted (GiB) | error |"
        sep += " ---: | ---: |"
    lines = [head, sep]
    ph = result["phases"]
    order = result.get("phase_order") or [n for n in ph if not n.startswith("round_")]  # the memory plan's
    for name in [*order, "round_sample", "round_update"]:
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


def add_parser(subparsers) -> None:
    """``lowmem-nablagfn profile``: its flags (the contract of :mod:`lowmem_nablagfn.cli`)."""
    p = subparsers.add_parser("profile", help="run a few updates; per-phase peak memory, time, throughput")
    add_config_arguments(p)
    p.add_argument("--updates", type=int, default=2, help="recorded updates (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up rounds")
    p.add_argument("--trace", metavar="DIR", help="also write a torch.profiler trace to DIR/trace.json")
    p.add_argument("--json", metavar="PATH", help="write the result here (default RUN_DIR/profile.json)")
    p.add_argument("--compare-plan", action="store_true", help="show the planner's prediction per phase")
    p.add_argument("--results", metavar="PATH",
                   help="markdown file to append to (default ./benchmarks/RESULTS.md when ./benchmarks exists)")
    p.add_argument("--no-results", action="store_true", help="do not append to a results file")


def run(args) -> int:
    """``lowmem-nablagfn profile``: ``args.cfg`` is the loaded, checked configuration."""
    import sys

    cfg = args.cfg
    result = run_profile(cfg, updates=args.updates, warmup=args.warmup,
                         trace_dir=Path(args.trace) if args.trace else None)
    predicted = None
    if args.compare_plan:
        from .planner import Probes, predict

        pred = predict(cfg, Probes(cfg))
        predicted = {k: v / GiB for k, v in pred.phases.items()}
        result["predicted_gib"] = predicted
        result["predicted_peak_gib"] = pred.peak / GiB
    table = measured_table(result, predicted)
    line = summary_line(result)
    if predicted is not None:
        line += f"; planner's predicted peak {result['predicted_peak_gib']:.3f} GiB"
    print(table)
    print(line)
    out = Path(args.json) if args.json else Path(cfg.logging.output_dir) / cfg.logging.run_name / "profile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"profile written to {out}")
    if not args.no_results:  # where the user runs, never inside the installed package
        path = Path(args.results) if args.results else results.default_results()
        if path is not None and path.parent.is_dir():
            command = "lowmem-nablagfn " + " ".join(sys.argv[1:])
            results.append_results(path, f"Profile: {args.preset}", command, table, line, threads=True)
            print(f"appended to {path}")
    return 0


__all__ = ["add_parser", "measured_table", "run", "run_profile", "summary_line"]
