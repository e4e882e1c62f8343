"""SDXL shapes on the CPU: the measured memory of every phase of one training round next to the
planner's prediction, at a reduced resolution (issue #17: the CPU check of the SDXL predictions).

    python benchmarks/sdxl_cpu_memory.py                        # sdxl-random, 256 px, fp32 (~20 GB RAM)
    python benchmarks/sdxl_cpu_memory.py --resolution 128 --variants preset,official
    python benchmarks/sdxl_cpu_memory.py --smoke                # tiny-sdxl, 64 px (the test suite runs it)

Workload: the ``sdxl_rtx4090`` preset with ``pretrained.model=sdxl-random`` (the SDXL base
architecture, random weights: 2.57 B UNet, CLIP ViT-L + OpenCLIP bigG text encoders, SDXL VAE), the
aesthetic reward at full size with random weights (CLIP ViT-L/14 + head), CFG 5, LoRA r8, on the CPU
in fp32 (this CPU has no fast bf16: see benchmarks/memory.py), at ``--resolution`` instead of 1024
px (the SDXL time ids follow it).  Sampling is cut to T = 10 steps and ``--trajectories`` trajectories
per update (``timestep_fraction`` 0.1: K = 1, two kept transitions each), so that a round takes minutes,
not hours; the phases and their code are those of a full run.  The models are loaded once; each variant
reconfigures them in place (``gpu_validate.reconfigure``) and runs one profiled round
(``profiler.run_profile``: encode, sample, final reward, the update's phases, the optimiser step):

* ``official`` — the official code's schedule (``planner.OFFICIAL_OVERRIDES``);
* ``preset``   — the ``sdxl_rtx4090`` memory settings as shipped;
* ``vae``      — the preset + ``memory.checkpoint_vae=true``;
* ``nof``      — no-flow with the 16 GB settings of the README (``model.no_flow=true
  memory.checkpoint_vae=true memory.offload_trajectories=true``; 8-bit AdamW left out: its state is
  one line of arithmetic, and bitsandbytes' CPU path is not what a card runs).

Memory is the CPU's :class:`~lowmem_nablagfn.memtrack.LiveBytes` (every live tensor storage, from the
bytes of the models, optimiser state and stored samples) — what ``max_memory_allocated`` counts on a
GPU less the GPU-only allowances, which the planner adds only for a GPU.  The prediction is
``planner.predict`` for the same configuration with ``device=cpu`` (traced on first use at this
resolution and cached, like any architecture the planner has not seen).  The optimiser state is
materialised before recording by one step on zero gradients, as a warm-up round would (without its
minutes), so that the measured phases hold it as the prediction does.

Prints a table and appends it to benchmarks/RESULTS.md (``--no-results``: not).
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, machine  # noqa: E402

import torch  # noqa: E402

from gpu_validate import QUIET, reconfigure  # noqa: E402  (benchmarks/gpu_validate.py)
from lowmem_nablagfn import loop as T  # noqa: E402
from lowmem_nablagfn import planner, profiler  # noqa: E402
from lowmem_nablagfn.config import load_config  # noqa: E402
from lowmem_nablagfn.memory import build_plan  # noqa: E402
from lowmem_nablagfn.memtrack import GiB  # noqa: E402

#: variant -> overrides on top of the workload (``official``: the planner's official baseline of it).
VARIANTS: Dict[str, List[str]] = {
    "official": [],
    "preset": [],
    "vae": ["memory.checkpoint_vae=true"],
    "nof": ["model.no_flow=true", "memory.checkpoint_vae=true", "memory.offload_trajectories=true"],
}
def workload(model: str, resolution: int, trajectories: int, out_dir: str, extra: List[str]) -> List[str]:
    return [f"pretrained.model={model}", "reward.checkpoint=random" if model == "sdxl-random" else
            "reward.checkpoint=random:reduced", "reward.weight_dtype=fp32", "device=cpu",
            "training.mixed_precision='no'", f"sampling.resolution={resolution}", "sampling.num_steps=10",
            f"sampling.batch_size={trajectories}", "sampling.num_batches_per_epoch=1",
            f"training.batch_size={trajectories}", "training.gradient_accumulation_steps=1",
            "training.on_policy=true", f"logging.output_dir={out_dir}", *QUIET, *extra]


def warm_optimizer(c) -> None:
    """The optimiser's state as after a first step (one step on zero gradients; the parameters move
    by the weight decay at most, which changes no byte count)."""
    params = [p for g in c.optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)


def run_variant(c, cfg, profile) -> dict:
    pred = planner.predict(cfg, profile)
    gc.collect()
    t0 = time.perf_counter()
    res = profiler.run_profile(cfg, updates=1, warmup=0, components=c)
    measured = {n: p["peak_gib"] for n, p in res["phases"].items() if n in res["phase_order"]}
    return {"measured": measured, "predicted": {n: v / GiB for n, v in pred.phases.items()},
            "peak_gib": res["summary"]["peak_gib"], "predicted_peak_gib": pred.peak / GiB,
            "predicted_phase": pred.peak_phase, "seconds": time.perf_counter() - t0, "memory": knobs(cfg),
            "table": profiler.measured_table(res, {n: v / GiB for n, v in pred.phases.items()})}


def knobs(cfg) -> str:
    """The variant's memory settings in a few words (its variant name says where they come from)."""
    m = cfg.memory
    ckpt = [n for n, on in build_plan(cfg).placement.checkpointing.items()
            if on and not (n == "flow" and cfg.model.no_flow)]
    return (f"{m.mode}{', no-flow' if cfg.model.no_flow else ''}; checkpointing: {', '.join(ckpt) or 'none'}; "
            f"chunks {m.input_grad_chunk or 'all'}/{m.train_chunk or 'all'}")


def table(results: Dict[str, dict]) -> str:
    """Each variant's phases as ``lowmem-nablagfn profile --compare-plan`` prints them, under its peak."""
    return "\n\n".join(
        f"**{name}** ({r['memory']}): peak {r['peak_gib']:.3f} GiB measured, {r['predicted_peak_gib']:.3f} "
        f"predicted ({r['predicted_phase']}, {r['predicted_peak_gib'] / r['peak_gib'] - 1:+.1%})\n\n{r['table']}"
        for name, r in results.items())


def measure_variants(preset: str, base: List[str], variants: Dict[str, List[str]], label: str) -> Dict[str, dict]:
    """One profiled round of each variant (overrides on ``base``; ``official``: the planner's official baseline)
    next to its prediction.  The models are built once per objective (residual / no-flow) and each variant
    switches them to its memory plan in place (``gpu_validate.reconfigure``)."""
    out: Dict[str, dict] = {}
    by_objective: Dict[bool, List[str]] = {}
    for name, overrides in variants.items():
        by_objective.setdefault("model.no_flow=true" in overrides, []).append(name)
    for no_flow, group in by_objective.items():
        t0 = time.perf_counter()
        c = T.setup(load_config(preset, base + [f"model.no_flow={no_flow}"]))
        warm_optimizer(c)
        print(f"set-up {time.perf_counter() - t0:.0f} s ({label}, no_flow={no_flow})", flush=True)
        for name in group:
            cfg = load_config(preset, base + variants[name])
            if name == "official":
                cfg = planner.official_baseline(cfg)
            if reconfigure(c, cfg):
                warm_optimizer(c)
            out[name] = r = run_variant(c, cfg, planner.Probes(cfg))
            print(f"[{name}] peak {r['peak_gib']:.3f} GiB measured, {r['predicted_peak_gib']:.3f} predicted "
                  f"({r['predicted_phase']}); {r['seconds']:.0f} s", flush=True)
        del c
        gc.collect()
    return out


def cpu_memory_parser(doc: str, variants: Dict[str, List[str]], resolution: int, trajectories: int,
                      smoke: str) -> argparse.ArgumentParser:
    """The options of a CPU memory benchmark (this one, benchmarks/sd3_cpu_memory.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=None, help=f"pixels; default {resolution} (smoke: 64)")
    ap.add_argument("--trajectories", type=int, default=trajectories,
                    help="trajectories per update (2 kept transitions each)")
    ap.add_argument("--variants", default=",".join(variants), help=f"comma-separated, of {', '.join(variants)}")
    ap.add_argument("--smoke", action="store_true", help=f"{smoke}: the code path, in seconds")
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default benchmarks/RESULTS.md)")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for every variant")
    return ap


def chosen(ap: argparse.ArgumentParser, args, variants: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """The variants ``--variants`` names, in its order (an unknown name: the parser's error)."""
    names = args.variants.split(",")
    unknown = [n for n in names if n not in variants]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}: choose from {', '.join(variants)}")
    return {n: variants[n] for n in names}


def write_results(args, title: str, text: str, notes: str) -> None:
    """Append the table to benchmarks/RESULTS.md (or ``--results``), unless ``--no-results``."""
    if args.no_results:
        return
    if args.results is None:
        append_results(title, " ".join(["python"] + sys.argv), text, notes)
    else:
        from lowmem_nablagfn import results

        results.append_results(args.results, title, "smoke" if args.smoke else " ".join(sys.argv), text, notes)


def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    ap = cpu_memory_parser(__doc__, VARIANTS, 256, 2, "tiny-sdxl")
    args = ap.parse_args(argv)
    variants = chosen(ap, args, VARIANTS)
    model = "tiny-sdxl" if args.smoke else "sdxl-random"
    res = args.resolution or (64 if args.smoke else 256)
    with tempfile.TemporaryDirectory() as tmp:
        base = workload(model, res, args.trajectories, tmp, args.overrides)
        out = measure_variants("sdxl_rtx4090", base, variants, f"{model}, {res} px")
    text = table(out)
    print(text)
    write_results(args, "SDXL shapes on the CPU: measured vs planner", text,
                  f"{model}, {res} px, fp32 on the CPU, sdxl_rtx4090 preset (CFG 5, LoRA r8, aesthetic reward "
                  f"ViT-L/14 random weights fp32), T = 10, {args.trajectories} trajectories x 2 kept transitions per "
                  f"update; measured: memtrack.LiveBytes over one profiled round after the optimiser state exists; "
                  f"predicted: planner.predict (device=cpu, no GPU allowances). {machine()}")
    return out


if __name__ == "__main__":
    main()
