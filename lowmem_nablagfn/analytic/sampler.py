"""Running the project's sampler on the analytic models: final samples of a policy, and samples of
the exact tilt of the untuned sampler's own output (what ∇-DB targets)."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..diffusion import StepSchedule, reward_weight
from ..sampling import sample
from .config import AnalyticConfig
from .exact import ExactEps, ExactVelocity, LinearReward


@contextlib.contextmanager
def single_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation (training ran 15x slower
    with 2 threads than with 1 on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dummy_cond(n: int) -> Tensor:
    return torch.zeros(n, 1, 1)


def sample_final(eps_model: nn.Module, sched: StepSchedule, n: int, seed: int,
                 chunk: int = 4096) -> Tensor:
    """``x_0`` of ``n`` trajectories of the project's sampler (no grad)."""
    g = torch.Generator().manual_seed(seed)
    dim = model_dim(eps_model)
    outs = []
    with single_thread():
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            traj = sample(lambda x, t, c: eps_model(x, t), sched, dummy_cond(b), (dim,), g,
                          keep=torch.full((b, 1), sched.num_steps - 1, dtype=torch.long))
            outs.append(traj.final_latents)
    return torch.cat(outs)


def model_dim(model: nn.Module) -> int:
    exact = model if isinstance(model, (ExactEps, ExactVelocity)) else model.exact
    return exact.mixture.dim


def sampler_tilted_samples(cfg: AnalyticConfig, sched: StepSchedule, n: int, seed: int,
                           pool: int = 20000) -> Tensor:
    """``n`` samples of ``p_sampler(x_0) exp(β w(ᾱ_0) R(x_0))``, where ``p_sampler`` is the untuned
    T-step sampler's own output distribution (importance resampling of ``pool`` untuned samples).

    This is the terminal distribution that residual ∇-DB actually targets (the reference *chain* is
    what it tilts), up to the untilted ``x_T`` (a Monte-Carlo Doob transform of the default chain
    changes the mode mass by < 0.003).  Its distance to the closed form measures the sampler's
    discretisation error, not the trainer's."""
    x = sample_final(cfg.exact_model(), sched, pool, seed).double()
    beta = cfg.reward_scale * float(reward_weight(sched.alpha_next[-1], cfg.reward_adaptive_mode))
    logw = beta * LinearReward(tuple(cfg.reward_direction))(x)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.multinomial(torch.softmax(logw, 0), n, replacement=True, generator=g)
    return x[idx]
