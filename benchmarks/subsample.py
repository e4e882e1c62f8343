"""Benchmark transition subsampling: per-trajectory Python loop vs vectorised reference vs kernel.

For each size ``BxTxCxHxW`` it builds the per-transition tensors the training step gathers
(latents, next latents and guided eps in bf16, timesteps in int64), then times drawing the
low-variance subsample and gathering it into fp32 training buffers with

* ``loop``: the official-style loop: per trajectory draw its indices, then per kept index and
  tensor, index and copy;
* ``reference``: :func:`lowmem_nablagfn.subsample.reference.select_and_gather` (vectorised torch);
* ``kernel``: :func:`lowmem_nablagfn.subsample.triton_kernel.select_and_gather` (CUDA only).

All three give identical buffers (checked before timing). Times are medians after warm-up,
synchronised on CUDA. Achieved bandwidth counts the bytes the gather must read and write; it is
compared with the device's copy bandwidth (a large ``Tensor.copy_``). A section is appended to
``benchmarks/RESULTS.md``.

    python benchmarks/subsample.py --quick          # CPU-friendly: the 64x50x4x64x64 size only
    python benchmarks/subsample.py                  # also 64x50x4x128x128
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowmem_nablagfn.results import cpu_name, load_average  # noqa: E402
from lowmem_nablagfn.subsample import reference  # noqa: E402

SIZES = ["64x50x4x64x64", "64x50x4x128x128"]
LOOP_REPEATS = 3
Result = Tuple[str, str, Optional[float], Optional[float]]  # size, method, ms, bytes moved


def make_tensors(batch: int, num_steps: int, shape: Tuple[int, ...],
                 device: torch.device) -> Dict[str, Tensor]:
    """bf16 latents / next latents / eps (B, T, C, H, W) and int64 timesteps (B, T)."""
    g = torch.Generator(device=device).manual_seed(0)

    def latent() -> Tensor:
        return torch.randn(batch, num_steps, *shape, generator=g, device=device).bfloat16()

    return {"latents": latent(), "next_latents": latent(), "eps": latent(),
            "timesteps": torch.arange(num_steps, device=device).flip(0).expand(batch, -1)}


def python_loop(tensors: Dict[str, Tensor], batch: int, num_steps: int, k: int, seed: int,
                dtype: torch.dtype) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The official-style loop: per trajectory draw, then per index and tensor, index and copy.

    Each trajectory's draw uses its own counters (``offset = b * K``), so the indices equal the
    vectorised draw's.
    """
    kept = reference.num_kept(num_steps, k)
    out = {name: torch.empty((batch, kept, *t.shape[2:]), dtype=reference.out_dtype(t, dtype),
                             device=t.device) for name, t in tensors.items()}
    rows = []
    for b in range(batch):
        row = reference.draw_indices(1, num_steps, k, True, seed, offset=b * k)[0]
        for s, step in enumerate(row.tolist()):
            for name, t in tensors.items():
                out[name][b, s].copy_(t[b, step])
        rows.append(row)
    return torch.stack(rows).to(next(iter(tensors.values())).device), out


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in ms, after ``warmup`` calls, synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int, repeats: int) -> float:
    """Bytes/s of ``dst.copy_(src)`` on a ``mib`` MiB tensor (read + write counted)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return 2 * src.numel() / (ms / 1e3)


def bytes_moved(tensors: Dict[str, Tensor], batch: int, kept: int, dtype: torch.dtype) -> int:
    """Bytes a gather must read (kept rows, input dtype) and write (output dtype), with indices."""
    total = batch * kept * 8  # the int64 indices
    for t in tensors.values():
        per_row = math.prod(t.shape[2:])
        out_size = torch.empty((), dtype=reference.out_dtype(t, dtype)).element_size()
        total += batch * kept * per_row * (t.element_size() + out_size)
    return total


def bench_size(size: str, args, device: torch.device, kernel) -> List[Result]:
    batch, num_steps, *shape = (int(x) for x in size.split("x"))
    k = reference.num_blocks(num_steps, args.fraction)
    tensors = make_tensors(batch, num_steps, tuple(shape), device)
    kept = reference.num_kept(num_steps, k)
    dtype = torch.float32
    methods = {
        "loop": lambda: python_loop(tensors, batch, num_steps, k, args.seed, dtype),
        "reference": lambda: reference.select_and_gather(tensors, batch, num_steps, k, True,
                                                         args.seed, 0, dtype),
    }
    if kernel is not None:
        methods["kernel"] = lambda: kernel.select_and_gather(tensors, batch, num_steps, k, True,
                                                             args.seed, 0, dtype)
    want_idx, want = methods["reference"]()
    for name, fn in methods.items():  # identical buffers, or the timings compare nothing
        idx, out = fn()
        assert torch.equal(idx, want_idx) and all(torch.equal(out[n], want[n]) for n in want), name
    moved = bytes_moved(tensors, batch, kept, dtype)
    label = f"{size}, K={k}"
    results: List[Result] = []
    for name, fn in methods.items():
        # the loop is slow and its spread small next to its gap to the others
        warmup, repeats = (1, LOOP_REPEATS) if name == "loop" else (args.warmup, args.repeats)
        results.append((label, name, median_ms(fn, device, warmup, repeats), moved))
    if kernel is None:
        results.append((label, "kernel", None, moved))
    return results


def machine(device: torch.device) -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    # CPU timings on a shared machine move with its load: record it
    load = f", load average {load_average():.1f} / {os.cpu_count()} CPUs"
    try:
        import triton
        tri = triton.__version__
    except Exception:  # any import failure only means no kernel
        tri = "not importable"
    return (f"{platform.platform()}; CPU {cpu} ({torch.get_num_threads()} torch threads{load}); "
            f"GPU {gpu}; torch {torch.__version__}; triton {tri}")


def table(results: List[Result], copy_bps: float, no_kernel: str) -> List[str]:
    loop_ms = {size: ms for size, method, ms, _ in results if method == "loop"}
    lines = ["| size BxTxCxHxW | method | median ms | GB/s | / copy bw | speed-up vs loop |",
             "|---|---|---:|---:|---:|---:|"]
    for size, method, ms, moved in results:
        if ms is None:
            lines.append(f"| {size} | {method} | {no_kernel} | | | |")
            continue
        bps = moved / (ms / 1e3)
        lines.append(f"| {size} | {method} | {ms:.2f} | {bps / 1e9:.1f} | {bps / copy_bps:.2f} | "
                     f"{loop_ms[size] / ms:.1f}x |")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {SIZES[0]}, fewer repeats")
    p.add_argument("--sizes", nargs="+", default=None, help=f"BxTxCxHxW sizes (default {SIZES})")
    p.add_argument("--fraction", type=float, default=0.1, help="timestep_fraction (K = T * it)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--copy-mib", type=int, default=None, help="tensor size for the copy bandwidth")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-append", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    sizes = args.sizes or (SIZES[:1] if args.quick else SIZES)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 256)

    kernel, no_kernel = None, "n/a (no GPU)"
    if device.type == "cuda":
        try:
            from lowmem_nablagfn.subsample import triton_kernel as kernel
        except Exception as exc:  # report, still time the rest
            no_kernel = f"n/a (triton: {type(exc).__name__})"

    copy_bps = copy_bandwidth(device, copy_mib, args.repeats)
    results = [r for size in sizes for r in bench_size(size, args, device, kernel)]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + shlex.join(sys.argv)
    section = [
        f"## Transition subsampling: loop vs reference vs kernel ({now})", "",
        f"- command: `{command}`",
        f"- machine: {machine(device)}",
        f"- device: {device}; copy bandwidth ({copy_mib} MiB `copy_`, read+write): "
        f"{copy_bps / 1e9:.1f} GB/s",
        f"- workload: low-variance draw, timestep_fraction={args.fraction} (K = int(T * it), "
        f"S = K+1 kept), gather bf16 latents/next latents/eps -> fp32 and int64 timesteps; "
        f"median of {args.repeats} after {args.warmup} warm-up (loop: {LOOP_REPEATS} after 1)",
        "", *table(results, copy_bps, no_kernel), "", ""]
    print("\n".join(section))
    if not args.no_append:
        new = not args.results.exists()
        with open(args.results, "a") as f:  # append only: other benchmarks write here too
            f.write(("# Benchmark results\n\n" if new else "\n") + "\n".join(section))
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
