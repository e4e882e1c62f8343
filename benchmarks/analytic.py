"""Analytic validation benchmark: does residual ∇-DB sample the reward-tilted distribution?

Runs on CPU in a few minutes::

    python benchmarks/analytic.py                 # full run, appends to benchmarks/RESULTS.md
    python benchmarks/analytic.py --no-append     # print only (and save the figure)
    python benchmarks/analytic.py --sampler flow-sde --methods nabla_db draft   # the flow-matching case

A 2-D Gaussian mixture is the "pretrained" diffusion model (exact noise prediction under the SD 1.5
schedule, the project's DDPM sampler), the reward is linear so the tilted target is a Gaussian mixture
in closed form, and residual ∇-DB, no-flow and a DRaFT-style reward-maximising baseline finetune a
small residual MLP on top of the exact model (see ``lowmem_nablagfn/analytic/``).  ``--sampler flow-sde``:
the same mixture under the rectified-flow interpolation (exact velocity, SD 3.5's shift-3 grid,
Flow-GRPO's SDE with noise level ``--noise-level``; docs/algorithm.md, "Flow matching (SD 3.5)").  Prints the table
(per-mode mass vs exact, max mass error, MMD vs exact samples, mean reward), saves a figure under
``benchmarks/figures/`` and appends a section to ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lowmem_nablagfn.results import cpu_name, load_average  # noqa: E402
from lowmem_nablagfn.analytic import (METHODS, AnalyticConfig, LinearReward,  # noqa: E402
                                      flow_matching_config, format_table, run_experiment, sampler_label,
                                      verdict)


def plot(target, untilted, rows, path: Path, max_points: int = 1500) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = torch.minimum(target.means.min(0).values, untilted.means.min(0).values) - 1.5
    hi = torch.maximum(target.means.max(0).values, untilted.means.max(0).values) + 1.5
    for r in rows:  # widen the window for collapsed / drifted baselines
        if r.samples is not None:
            q = torch.quantile(r.samples.double(), torch.tensor([0.005, 0.995], dtype=torch.float64), dim=0)
            lo, hi = torch.minimum(lo, q[0] - 0.3), torch.maximum(hi, q[1] + 0.3)
    gx = torch.linspace(float(lo[0]), float(hi[0]), 200, dtype=torch.float64)
    gy = torch.linspace(float(lo[1]), float(hi[1]), 200, dtype=torch.float64)
    xx, yy = torch.meshgrid(gx, gy, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    dens = target.log_prob(grid).exp().reshape(xx.shape)
    dens0 = untilted.log_prob(grid).exp().reshape(xx.shape)
    n = len(rows)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 2.6 * nrows + 0.6), sharex=True,
                             sharey=True, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, rows):
        ax.contour(xx, yy, dens0, levels=4, colors="0.75", linewidths=0.6, linestyles="dashed")
        ax.contour(xx, yy, dens, levels=6, cmap="viridis", linewidths=0.9)
        if r.samples is not None:
            s = r.samples[:max_points].double()
            ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:red", alpha=0.35, linewidths=0)
        m = r.metrics
        ax.set_title(f"{r.name}\nmass {'/'.join(f'{v:.2f}' for v in m['mass'])}, MMD {m['mmd']:.3f}",
                     fontsize=8)
        ax.set_aspect("equal")
    fig.suptitle("exact tilted target (contours; dashed: untilted data) vs samples (red)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs (load avg {load_average():.1f} at the end: shared with "
            f"other jobs), training single-threaded; Python {platform.python_version()}, torch {torch.__version__}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=None, help="override num_epochs of every method")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="ddim", choices=("ddim", "flow-sde"),
                   help="ddim: DDPM on the SD 1.5 schedule; flow-sde: flow matching (SD 3.5 grid, Flow-GRPO SDE)")
    p.add_argument("--noise-level", type=float, default=None, help="flow-sde's a (default 0.7)")
    p.add_argument("--figure", default=str(HERE / "figures" / "analytic_tilt.png"))
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--section-file", default=None,
                   help="with --no-append: write the RESULTS.md section to this file instead")
    p.add_argument("--log-every", type=int, default=0)
    args = p.parse_args(argv)

    cfg = flow_matching_config(seed=args.seed) if args.sampler == "flow-sde" else AnalyticConfig(seed=args.seed)
    if args.noise_level is not None:
        cfg.noise_level = args.noise_level
    if args.epochs is not None:
        cfg.num_epochs = args.epochs
    start = time.perf_counter()
    target, rows = run_experiment(cfg, args.methods, log_every=args.log_every)
    wall = time.perf_counter() - start
    reward = LinearReward(tuple(cfg.reward_direction))
    table = format_table(target, rows, cfg.mixture(), reward)
    met, why = verdict(rows)
    print(table)
    print(f"\nacceptance (mass within 0.05, lower MMD than the baseline, baseline reward >=): {why}")
    print(f"wall time {wall:.0f} s")
    fig = Path(args.figure)
    plot(target, cfg.mixture(), rows, fig)
    print(f"figure: {fig}")

    if not args.no_append or args.section_file:
        defaults = flow_matching_config() if cfg.flow_matching else AnalyticConfig()
        changed = {f.name: getattr(cfg, f.name) for f in fields(cfg)
                   if getattr(cfg, f.name) != getattr(defaults, f.name)}
        # the command that reproduces the numbers (output-destination flags left out)
        given = list(argv if argv is not None else sys.argv[1:])
        kept, skip = [], False
        for a in given:
            if skip:
                skip = False
            elif a in ("--no-append",):
                continue
            elif a in ("--section-file", "--results", "--figure", "--log-every"):
                skip = True
            elif a.split("=")[0] in ("--section-file", "--results", "--figure", "--log-every"):
                continue
            else:
                kept.append(a)
        cmd = " ".join(["python benchmarks/analytic.py", *kept])
        try:
            rel_fig = fig.resolve().relative_to(HERE)
        except ValueError:
            rel_fig = fig
        base_name = "flow_matching_config()" if cfg.flow_matching else "AnalyticConfig"
        if cfg.flow_matching:
            model_text = (f"exact velocity v* of the rectified flow x_t = (1-t) x_0 + t ε on SD 3.5's grid (shift 3), "
                          f"Flow-GRPO's SDE with a = {cfg.noise_level} and T={cfg.num_steps}")
            tilt_text = "β·(1-t_0)² = β"
        else:
            model_text = f"exact ε* under the SD 1.5 schedule, DDPM (DDIM eta=1) with T={cfg.num_steps}"
            tilt_text = "β·ᾱ_0"
        section = "\n".join([
            "",
            f"## Analytic validation{' (flow matching)' if cfg.flow_matching else ''}: residual ∇-DB vs the exact "
            f"reward-tilted target "
            f"({_dt.datetime.now().strftime('%Y-%m-%d %H:%M')})",
            "",
            f"- Command: `{cmd}`",
            f"- Machine: {machine()}",
            f"- Wall time: {wall:.0f} s (all methods, evaluation included)",
            f"- Setting (`lowmem_nablagfn/analytic/`, `{base_name}`{' with ' + str(changed) if changed else ' defaults'}): "
            f"data = {len(cfg.weights)}-component isotropic Gaussian mixture in 2-D, means {list(cfg.means)}, "
            f"stds {list(cfg.stds)}, weights {list(cfg.weights)}; {model_text}; "
            f"R(x) = a·x, a = {list(cfg.reward_direction)}, "
            f"β = {cfg.reward_scale} (effective terminal tilt {tilt_text}); residual MLP policy "
            f"(`residual_param={cfg.residual_param!r}`), flow MLP, λ_rev = {cfg.reverse_loss_scale}, "
            f"λ_reg = {cfg.unet_reg_scale}, timestep_fraction = {cfg.timestep_fraction}, "
            f"{cfg.num_epochs} epochs × {cfg.num_traj} trajectories, {cfg.batches_per_epoch} optimiser steps/epoch, "
            f"{'on-policy' if cfg.on_policy else 'one-epoch lag'}, cosine lr decay to {cfg.final_lr_fraction}×; "
            f"baseline DRaFT-{cfg.draft_steps} maximises mean R(x_0) (no KL, {cfg.draft_epochs} epochs, lr "
            f"{cfg.draft_learning_rate}); {cfg.num_eval} evaluation samples per method; MMD = √(biased MMD²), "
            f"sum of RBF kernels with bandwidths 0.1–2, vs {cfg.num_eval} exact samples of the closed-form "
            f"tilted target, and vs {cfg.num_eval} samples of the exact tilt of the {sampler_label(cfg)} "
            f"reference sampler's own output (importance-resampled; what ∇-DB targets).",
            f"- Figure: `{rel_fig}`",
            "",
            table,
            "",
            f"Acceptance (residual ∇-DB's per-mode mass within 0.05 of the exact tilted weights, lower MMD "
            f"than the reward-maximising baseline, whose reward is at least as high): {why}.",
            "",
        ])
        path = Path(args.section_file if args.no_append else args.results)
        with open(path, "a", encoding="utf-8") as f:
            if path.stat().st_size == 0 and not args.no_append:
                f.write("# Benchmark results\n")
            f.write(section)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
