"""Reward models: time and peak memory of score -> pixel gradient, and the error of bf16 storage.

Full-size architectures with random weights (``reward.checkpoint=random``: no files needed):
aesthetic (CLIP ViT-L/14 + head), HPSv2 (OpenCLIP ViT-H-14), ImageReward (BLIP ViT-L/16 + BERT).
For each reward, variant (weight storage, block checkpointing) and batch size it warms up once,
then reports the median of ``--repeats`` forward+backward passes (``R(x).sum()`` -> ``dR/dx``) and
the peak memory above what was allocated before the pass (weights and inputs excluded):
``torch.cuda.max_memory_allocated`` on CUDA (one more pass), on CPU the peak of live tensor bytes
created in the timed passes (a TorchDispatchMode that follows every storage until it is freed).  HPS text features are
precomputed first, as in training.  Then the bf16-storage error: the same weights stored in bf16
(math in fp32) against fp32 on random images — relative score error and pixel-gradient cosine.

    python benchmarks/rewards.py            # batch 1 and 4, fp32 / fp32+ckpt / bf16+ckpt
    python benchmarks/rewards.py --quick    # batch 1, fp32 only, one timed pass

Prints a table and appends a section to benchmarks/RESULTS.md (``--no-append`` to skip).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowmem_nablagfn.config import RewardConfig  # noqa: E402
from lowmem_nablagfn.memtrack import LiveBytes  # noqa: E402
from lowmem_nablagfn.results import cpu_name, load_average  # noqa: E402
from lowmem_nablagfn.rewards import build_reward  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PROMPTS = ["a photo of a cat sitting on a windowsill", "an oil painting of a lighthouse at dusk",
           "a bowl of fruit, studio lighting", "a futuristic city skyline at night, concept art"]
VARIANTS = {"fp32": ("fp32", False), "fp32+ckpt": ("fp32", True), "bf16": ("bf16", False),
            "bf16+ckpt": ("bf16", True)}




def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_grad(reward, x, prompts):
    x = x.detach().requires_grad_(True)
    score = reward(x, prompts)
    (grad,) = torch.autograd.grad(score.sum(), x)
    return score.detach(), grad


def timed(reward, x, prompts, repeats, warmup=True):
    """(median seconds, peak bytes above the memory before a pass).

    On CPU the timed passes run under :class:`LiveBytes` (its per-op Python cost is far below a
    second here); on CUDA the peak comes from one more, untimed pass.
    """
    if warmup:
        score_grad(reward, x, prompts)
    times, peak, cpu = [], 0, x.device.type != "cuda"
    for _ in range(repeats):
        gc.collect()
        sync(x.device)
        with LiveBytes(new_only=True) if cpu else contextlib.nullcontext() as mem:
            start = time.perf_counter()
            score_grad(reward, x, prompts)
            sync(x.device)
            times.append(time.perf_counter() - start)
        peak = max(peak, mem.peak) if cpu else peak
    if not cpu:
        gc.collect()
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        score_grad(reward, x, prompts)
        peak = torch.cuda.max_memory_allocated(x.device) - before
    return statistics.median(times), peak


def images(batch, resolution, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, resolution, resolution, generator=g).to(device)


def build(name, weight_dtype, checkpointing, device, checkpoint="random"):
    reward = build_reward(RewardConfig(name=name, checkpoint=checkpoint, weight_dtype=weight_dtype), device)
    if hasattr(reward, "set_checkpointing"):
        reward.set_checkpointing(checkpointing)
    if hasattr(reward, "precompute_text"):
        reward.precompute_text(PROMPTS)
    return reward


def bf16_error(name, resolution, device, batch=2):
    """Relative score error and pixel-gradient cosine of bf16 storage against fp32, same weights."""
    reward = build(name, "fp32", False, device)
    x, prompts = images(batch, resolution, device, seed=1), PROMPTS[:batch]
    s32, g32 = score_grad(reward, x, prompts)
    reward.store_weights(torch.bfloat16)
    s16, g16 = score_grad(reward, x, prompts)
    rel = ((s16 - s32).abs() / s32.abs().clamp_min(1e-12)).max().item()
    cos = F.cosine_similarity(g16.flatten(1), g32.flatten(1), dim=1).min().item()
    return rel, (s16 - s32).abs().max().item(), s32.abs().mean().item(), cos


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rewards", nargs="+", default=["aesthetic", "hpsv2", "imagereward"])
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 4 (--quick: 1)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                   help="default fp32 fp32+ckpt bf16+ckpt (--quick: fp32)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per setting (default 3, --quick 1)")
    p.add_argument("--resolution", type=int, default=512, help="side of the input images (resized to 224)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-error", action="store_true", help="skip the bf16-storage error measurement")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    batches = args.batches or ([1] if args.quick else [1, 4])
    variants = args.variants or (["fp32"] if args.quick else ["fp32", "fp32+ckpt", "bf16+ckpt"])
    repeats = args.repeats or (1 if args.quick else 3)
    device = torch.device(args.device)

    load_before = load_average()
    rows = []
    for name in args.rewards:
        for variant in variants:
            dtype, ckpt = VARIANTS[variant]
            start = time.perf_counter()
            reward = build(name, dtype, ckpt, device)
            build_s = time.perf_counter() - start
            params = sum(p.numel() for p in reward.parameters()) / 1e6
            for i, batch in enumerate(batches):
                x, prompts = images(batch, args.resolution, device), (PROMPTS * batch)[:batch]
                seconds, peak = timed(reward, x, prompts, repeats, warmup=i == 0)  # one warm-up per model
                peak /= 2**20
                rows.append((name, f"{params:.1f}", variant, batch, seconds, peak))
                print(f"{name:12s} {variant:10s} batch {batch}: {seconds:7.2f} s  peak +{peak:8.1f} MiB "
                      f"(build {build_s:.1f} s)", flush=True)
            del reward
            gc.collect()

    errors = []
    if not args.no_error:
        for name in args.rewards:
            rel, abs_err, mean, cos = bf16_error(name, args.resolution, device)
            errors.append((name, rel, abs_err, mean, cos))
            print(f"{name:12s} bf16 storage: max rel score error {rel:.2e} (max abs {abs_err:.2e}, "
                  f"mean |score| {mean:.3g}), min pixel-gradient cosine {cos:.6f}", flush=True)

    memory = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "peak live tensor bytes (TorchDispatchMode)")
    lines = ["| reward | params (M) | weights | batch | fwd+bwd median (s) | peak above weights (MiB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {pm} | {v} | {b} | {s:.2f} | {m:.0f} |" for n, pm, v, b, s, m in rows]
    if errors:
        lines += ["", "bf16 weight storage (fp32 math) against fp32 storage, same random weights, 2 random images:", "",
                  "| reward | max relative score error | max abs error | mean abs score | min pixel-gradient cosine |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {n} | {r:.2e} | {a:.2e} | {m:.3g} | {c:.6f} |" for n, r, a, m, c in errors]
    table = "\n".join(lines)
    print("\n" + table)

    if not args.no_append:
        if device.type == "cuda":
            machine = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
        else:
            load_after = load_average()
            machine = (f"CPU {cpu_name()}, {torch.get_num_threads()} torch threads, "
                       f"{os.cpu_count()} CPUs, 1-min load average {load_before:.1f} at start / {load_after:.1f} "
                       f"at end (a shared machine: times are upper bounds), torch {torch.__version__}")
        command = "python benchmarks/rewards.py " + " ".join(argv if argv is not None else sys.argv[1:])
        section = [f"\n## Reward models: score -> pixel gradient ({datetime.date.today().isoformat()})", "",
                   f"- command: `{command.strip()}`", f"- machine: {machine}",
                   f"- full-size architectures, random weights; inputs {args.resolution} px (resized to 224); "
                   f"median of {repeats} after one warm-up per model; memory: {memory}, "
                   "above the memory before the pass",
                   "- variants: fp32 / bf16 = weight storage (math always fp32); "
                   "+ckpt = block activation checkpointing",
                   "", table, ""]
        new = not RESULTS.exists()
        with RESULTS.open("a") as f:
            if new:
                f.write("# Benchmark results\n\nEach section is appended by a script in benchmarks/.\n")
            f.write("\n".join(section))
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
