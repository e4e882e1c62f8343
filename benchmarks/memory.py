"""Peak memory of one training update (``accumulate_gradients`` on one batch of rows), official schedule vs optimised,
residual and no-flow, on full-size Stable Diffusion 1.5 shapes with random weights.

    python benchmarks/memory.py                      # CPU: 256 px, fp32; CUDA: 512 px, bf16
    python benchmarks/memory.py --trajectories 2 --variants official,optimized,lowmem [key=value ...]

Workload: ``pretrained.model=sd15-random`` (859.5 M UNet, 83.7 M VAE, 123 M text encoder), CFG 5, LoRA
rank 8, the aesthetic reward at full size with random weights (CLIP ViT-L/14 image tower + head,
304 M parameters, fp32: ``reward.checkpoint=random``), T = 50 DDPM steps with
``timestep_fraction=0.02`` (K = 1: two transitions per trajectory train, the last one and one other),
``--trajectories`` trajectories (2 rows each).  The rows are synthetic latents (sampling 50 steps first
would cost minutes on a CPU and does not change the update's memory).

Variants (the optimised schedule is exact: tests/test_memory.py):

* ``official``  — the official code's order and granularity: one graph and one backward per
  transition slot of ``--trajectories`` rows (memory.mode=official); the baseline of the ratios;
* ``naive``     — the same passes with the whole batch in one graph (memory.mode=naive; the tests'
  gradient reference, (K+1)x the official schedule's activations; not run by default);
* ``optimized`` — the pass schedule of lowmem_nablagfn.memory, input-gradient passes one row at a
  time (input_grad_chunk=1), no checkpointing;
* ``lowmem``    — ``optimized`` + checkpointing of UNet, VAE, reward towers and flow model, training
  pass one row at a time (the sd15_v100 / sd15_nof_lowmem settings).

How the peak is measured:

* CUDA: ``torch.cuda.max_memory_allocated`` around the update, reset before each variant; "resident"
  is ``torch.cuda.memory_allocated`` before it (weights, the rows).
* CPU: :class:`lowmem_nablagfn.memtrack.LiveBytes`, a ``TorchDispatchMode`` that sees every tensor an
  aten op returns and keeps the bytes of each distinct live storage (views share their storage and
  count once; a weak-reference callback on the storage removes it when freed), starting from the bytes
  of every model parameter and buffer and of the rows.  Its peak is the maximum of the live sum — what
  ``max_memory_allocated`` counts on a GPU, less kernel workspaces (cuDNN, fused attention) and
  allocator rounding/fragmentation, which it cannot see.  The process's resident set size is no
  substitute: glibc keeps freed pages, so RSS only ever records the high-water mark of the process.

Precision: bf16 on CUDA (what the GPU presets use).  On this CPU fp32: it has no AVX512-BF16, and a
bf16 convolution ran 70x slower than fp32 (220 s vs 3 s, 64x256x32x32, 3x3), which would make the
benchmark take hours; in bf16 the frozen-weight and most activation bytes halve (the LoRA and reward
math stay fp32), so the CPU figures are about twice a bf16 run's, and the official/optimised ratios carry
over.  The planner (``lowmem-nablagfn plan``) predicts the bf16 / 512 px figures on GPU cards.

Prints a table and appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, machine  # noqa: E402

from lowmem_nablagfn import memtrack  # noqa: E402
from lowmem_nablagfn import loop as T  # noqa: E402
from lowmem_nablagfn.config import MemoryConfig, load_config  # noqa: E402
from lowmem_nablagfn.memory import Rows, accumulate_gradients, build_plan  # noqa: E402
from lowmem_nablagfn.memtrack import GiB  # noqa: E402

VARIANTS = {
    "official": dict(mode="official"),
    "naive": dict(mode="naive"),
    "optimized": dict(mode="optimized", input_grad_chunk=1),
    "lowmem": dict(mode="optimized", input_grad_chunk=1, train_chunk=1, checkpoint_unet=True,
                   checkpoint_vae=True, checkpoint_reward=True, checkpoint_flow=True),
}


def make_rows(c, n_traj: int, seed: int = 0) -> Rows:
    """``n_traj`` trajectories x 2 transitions (one drawn step, the last one) of synthetic latents."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2 * n_traj, *c.latent_shape)
    steps = c.sched.num_steps
    step = torch.tensor([int(torch.randint(steps - 1, (1,), generator=gen)), steps - 1] * n_traj)
    prompts = [c.prompts[i % len(c.prompts)] for i in range(n_traj)]
    cond = T.encode(c, prompts).repeat_interleave(2, 0)
    rand = lambda: torch.randn(shape, generator=gen).to(c.device)  # noqa: E731
    return Rows(x=rand(), x_next=rand(), eps_sampled=rand(), step_index=step.to(c.device), cond=cond,
                prompts=[p for p in prompts for _ in range(2)], end=(step == steps - 1).to(c.device),
                slot=torch.tensor([0, 1] * n_traj, device=c.device))


def measure(c, rows: Rows, opts: dict) -> dict:
    """Peak bytes and time of one ``accumulate_gradients`` call under the memory options ``opts``."""
    plan = build_plan(MemoryConfig(**opts), c.flow_model is not None)  # the plan the trainer would run
    plan.placement.apply_checkpointing(c.parts.denoiser, c.parts.vae, c.reward_model, c.flow_model)
    ctx = T.update_context(c)
    ctx.plan = plan
    c.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    from lowmem_nablagfn.sampling import as_conditioning  # SDXL: pooled embeddings and time ids too

    existing = [rows.x, rows.x_next, rows.eps_sampled, rows.step_index, rows.end,
                *as_conditioning(rows.cond).tensors(), *as_conditioning(c.uncond).tensors()]
    for module in (c.parts.denoiser, c.parts.vae, *c.parts.text_encoders, c.flow_model, c.reward_model):
        if module is not None:
            existing += list(module.parameters()) + list(module.buffers())
    n_end = float(rows.end.sum())
    with memtrack.recording(c.device, existing=existing) as rec:
        resident = rec.source.current
        t0 = time.perf_counter()
        accumulate_gradients(ctx, rows, row_norm=float(len(rows)), end_norm=n_end + 1e-6, scale=1.0)
        if c.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = rec.overall_peak()
    phases = {n: s.peak_bytes for n, s in rec.phases.items()}
    c.optimizer.zero_grad(set_to_none=True)
    return {"peak": peak, "resident": resident, "seconds": seconds, "phases": phases,
            "peak_phase": max(phases, key=phases.get) if phases else "-"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=1, help="trajectories per batch (2 rows each)")
    ap.add_argument("--resolution", type=int, default=None, help="default: 512 on CUDA, 256 on CPU")
    ap.add_argument("--variants", default="official,optimized,lowmem")
    ap.add_argument("--objectives", default="residual,no_flow")
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    res = args.resolution or (512 if cuda else 256)
    precision = "bf16" if cuda else "'no'"  # quoted: YAML reads a bare no as false
    variants = args.variants.split(",")
    results = []
    for objective in args.objectives.split(","):
        cfg = load_config(None, [
            "pretrained.model=sd15-random", f"sampling.resolution={res}", f"training.mixed_precision={precision}",
            "reward.name=aesthetic", "reward.checkpoint=random", "reward.weight_dtype=fp32",
            "model.timestep_fraction=0.02", "sampling.num_steps=50", "sampling.guidance_scale=5.0",
            f"training.batch_size={args.trajectories}", "training.gradient_accumulation_steps=1",
            f"sampling.batch_size={args.trajectories}", f"model.no_flow={objective == 'no_flow'}",
            "logging.sample_grid_seeds=0", "logging.tensorboard=false", "logging.output_dir=/tmp/lowmem_bench",
            *args.overrides])
        t0 = time.perf_counter()
        c = T.setup(cfg)
        rows = make_rows(c, args.trajectories)
        print(f"[{objective}] set-up {time.perf_counter() - t0:.0f} s; {len(rows)} rows, latents "
              f"{tuple(rows.x.shape[1:])}", flush=True)
        for name in variants:
            r = measure(c, rows, VARIANTS[name])
            results.append((objective, name, r))
            print(f"[{objective}] {name}: peak {r['peak'] / GiB:.3f} GiB (resident {r['resident'] / GiB:.3f}), "
                  f"{r['seconds']:.1f} s, peak in {r['peak_phase']}", flush=True)
        del c, rows
        gc.collect()

    lines = ["| objective | variant | peak (GiB) | above resident (GiB) | vs official (peak) | vs official (above resident) "
             "| peak phase | s |", "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for objective, name, r in results:
        base = next((x for o, n, x in results if o == objective and n == "official"), None)
        act = r["peak"] - r["resident"]
        ratio = f"{r['peak'] / base['peak']:.2f}x" if base else "–"
        ratio_act = f"{act / (base['peak'] - base['resident']):.2f}x" if base else "–"
        lines.append(f"| {objective} | {name} | {r['peak'] / GiB:.3f} | {act / GiB:.3f} | {ratio} | {ratio_act} | "
                     f"{r['peak_phase']} | {r['seconds']:.1f} |")
    phases = sorted({p for _, _, r in results for p in r["phases"]})
    lines += ["", "Peak live total per phase (GiB):", "",
              "| objective | variant | " + " | ".join(phases) + " |", "| --- | --- |" + " ---: |" * len(phases)]
    for objective, name, r in results:
        lines.append(f"| {objective} | {name} | " + " | ".join(
            f"{r['phases'][p] / GiB:.3f}" if p in r["phases"] else "–" for p in phases) + " |")
    table = "\n".join(lines)
    print(table)
    source = "torch.cuda.max_memory_allocated" if cuda else "memtrack.LiveBytes (live tensor storages)"
    notes = (f"sd15-random, {res} px, frozen parts {'bf16' if cuda else 'fp32'}, CFG 5, LoRA r8, aesthetic "
             f"reward (ViT-L/14, random weights, fp32), {args.trajectories} trajectory x 2 transitions = "
             f"{2 * args.trajectories} rows; peak from {source}; resident = weights + rows before the update. "
             f"Variants: see benchmarks/memory.py. {machine()}")
    if not args.no_results:
        append_results("Peak memory of one training update", " ".join(["python"] + sys.argv), table, notes)


if __name__ == "__main__":
    main()
