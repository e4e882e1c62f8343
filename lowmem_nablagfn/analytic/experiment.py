"""The analytic experiment: train each method, evaluate it against the exact tilted target, the
table and the acceptance verdict (``benchmarks/analytic.py`` prints and records them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .config import AnalyticConfig, target_mixture
from .exact import GaussianMixture, LinearReward
from .metrics import evaluate, kernel_mean
from .sampler import sample_final, sampler_tilted_samples
from .training import METHODS, train


@dataclass
class Row:
    name: str
    metrics: Dict[str, object]
    seconds: float = 0.0
    samples: Optional[Tensor] = None


def sampler_label(cfg: AnalyticConfig) -> str:
    """``DDPM-50`` or ``flow-SDE-50 (a=0.7)``."""
    if cfg.flow_matching:
        return f"flow-SDE-{cfg.num_steps} (a={cfg.noise_level:g})"
    return f"DDPM-{cfg.num_steps}"


def run_experiment(cfg: AnalyticConfig, methods: Sequence[str] = METHODS,
                   log_every: int = 0) -> Tuple[GaussianMixture, List[Row]]:
    """Train each method and evaluate it, the untuned model and exact samples against the exact
    tilted target.  Returns the target and one :class:`Row` per line of the table."""
    sched = cfg.schedule()
    target = target_mixture(cfg, sched)
    reward = LinearReward(tuple(cfg.reward_direction))
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    reference = target.sample(cfg.num_eval, g)
    kyy = kernel_mean(reference, reference)
    sampler_ref = sampler_tilted_samples(cfg, sched, cfg.num_eval, cfg.seed + 11)
    sampler_kyy = kernel_mean(sampler_ref, sampler_ref)

    def row(name: str, samples: Tensor, seconds: float = 0.0) -> Row:
        return Row(name, evaluate(samples, target, reward, reference, kyy, sampler_ref, sampler_kyy),
                   seconds, samples)

    rows = [row("exact tilted target (fresh samples)", target.sample(cfg.num_eval, g))]
    rows.append(row(f"exact tilt of the {sampler_label(cfg)} reference sampler (resampled)",
                    sampler_tilted_samples(cfg, sched, cfg.num_eval, cfg.seed + 3)))
    exact = cfg.exact_model()
    rows.append(row("pretrained (untuned)", sample_final(exact, sched, cfg.num_eval, cfg.seed + 7)))
    names = {"nabla_db": "residual ∇-DB", "no_flow": "no-flow (forward only)",
             "draft": f"DRaFT-{cfg.draft_steps} (reward max.)"}
    for method in methods:
        res = train(method, cfg, sched, log_every=log_every)
        with torch.no_grad():
            xs = sample_final(res.policy, sched, cfg.num_eval, cfg.seed + 7)
        rows.append(row(names[method], xs, res.seconds))
    return target, rows


def format_table(target: GaussianMixture, rows: Sequence[Row], untilted: GaussianMixture,
                 reward: LinearReward) -> str:
    exact_mass = "/".join(f"{float(w):.3f}" for w in target.weights)
    prior_mass = "/".join(f"{float(w):.3f}" for w in untilted.weights)
    exact_reward = float(reward(target.mean().unsqueeze(0)).squeeze())
    lines = [
        f"exact tilted per-mode mass {exact_mass} (untilted {prior_mass}); "
        f"exact mean reward {exact_reward:.3f}",
        "",
        "| method | per-mode mass | max mass error | MMD vs exact | MMD vs tilted sampler "
        "| mean reward | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.metrics
        mmd_s = f"{m['mmd_sampler']:.4f}" if "mmd_sampler" in m else "-"
        lines.append(f"| {r.name} | {'/'.join(f'{v:.3f}' for v in m['mass'])} | "
                     f"{m['mass_error']:.3f} | {m['mmd']:.4f} | {mmd_s} | {m['reward']:.3f} | "
                     f"{f'{r.seconds:.0f}' if r.seconds else '-'} |")
    return "\n".join(lines)


def verdict(rows: Sequence[Row], tolerance: float = 0.05) -> Tuple[bool, str]:
    """The analytic-validation acceptance on a :func:`run_experiment` table: residual ∇-DB's per-mode
    mass within ``tolerance`` of the exact tilted weights, a lower MMD than the reward-maximising
    baseline, whose mean reward is at least as high.  Returns (met, one-line explanation)."""
    by = {r.name.split(" ")[0]: r.metrics for r in rows}
    nabla = by.get("residual")
    base = next((r.metrics for r in rows if r.name.startswith("DRaFT")), None)
    if nabla is None or base is None:
        return False, "needs the nabla_db and draft rows"
    checks = [(nabla["mass_error"] <= tolerance,
               f"mass error {nabla['mass_error']:.3f} {'<=' if nabla['mass_error'] <= tolerance else '>'} {tolerance}"),
              (nabla["mmd"] < base["mmd"], f"MMD {nabla['mmd']:.3f} vs baseline {base['mmd']:.3f}"),
              (base["reward"] >= nabla["reward"],
               f"baseline reward {base['reward']:.3f} vs {nabla['reward']:.3f}")]
    met = all(ok for ok, _ in checks)
    return met, ("met" if met else "NOT met") + ": " + "; ".join(text for _, text in checks)


def config_dict(cfg: AnalyticConfig) -> dict:
    return asdict(cfg)
