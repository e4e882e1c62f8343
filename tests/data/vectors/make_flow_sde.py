"""Reference vectors of the flow-sde step (docs/algorithm.md, "Flow matching (SD 3.5)"), independent of
the package: float64 numpy, the formulas written out, no diffusers, no torch.

    python tests/data/vectors/make_flow_sde.py      # rewrites tests/data/vectors/flow_sde_*.npz

The step grid is FlowMatchEulerDiscreteScheduler's with a static ``shift`` (what StableDiffusion3Pipeline
runs), written out: training sigmas ``i / N`` (i = N … 1) shifted, ``σ_max``/``σ_min`` the first/last
of them; inference timesteps ``linspace(N σ_max, N σ_min, T)``, sigmas = timesteps / N shifted once
more (diffusers applies the shift to the already shifted end points), then 0 appended.

The step is Flow-GRPO's SDE (``t`` the sigma of ``x_t``, ``dt = t_next - t < 0``, ``a`` the noise level,
``σ_t = a √(t / (1 - t'))`` with ``t' = t`` except at ``t = 1``, where ``t'`` is the second sigma)::

    x_{t-1} = x + [v + σ_t² / (2t) (x + (1 - t) v)] dt + σ_t √(-dt) ε
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NUM_TRAIN = 1000


def shifted(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def flow_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """(T + 1,) sigmas of the inference grid, the last one 0."""
    train = shifted(np.arange(NUM_TRAIN, 0, -1, dtype=np.float64) / NUM_TRAIN, shift)
    sigma_max, sigma_min = train[0], train[-1]
    timesteps = np.linspace(sigma_max * NUM_TRAIN, sigma_min * NUM_TRAIN, num_steps)
    return np.append(shifted(timesteps / NUM_TRAIN, shift), 0.0)


def make(name: str, seed: int, num_steps: int, shift: float, noise_level: float, step_index) -> None:
    rng = np.random.default_rng(seed)
    sig = flow_sigmas(num_steps, shift)
    j = np.asarray(step_index, dtype=np.int64)
    n = j.size
    shape = (n, 4, 8, 8)
    col = lambda a: a.reshape(-1, 1, 1, 1)  # noqa: E731
    t, t_next = sig[j], sig[j + 1]
    dt = t_next - t
    t_den = np.where(t == 1.0, sig[1], t)
    sde_sigma = noise_level * np.sqrt(t / (1 - t_den))  # σ_t
    std = sde_sigma * np.sqrt(-dt)

    def mean_of(x, v):
        """Flow-GRPO's drift step, exactly as written (not as coefficients)."""
        s2, tt = col(sde_sigma**2), col(t)
        return x + (v + s2 / (2 * tt) * (x + (1 - tt) * v)) * col(dt)

    x = rng.standard_normal(shape)
    v = rng.standard_normal(shape)
    v_next = rng.standard_normal(shape)
    slope = 0.37
    offset = rng.standard_normal(shape)
    strength = 0.8
    mean = mean_of(x, v)
    x_prev = mean + col(std) * rng.standard_normal(shape)
    score_next = strength * -(x_prev - mean) / col(std**2)
    # reverse score with v(x) = slope x + offset: d mean / dx = (1 + σ²dt/(2t)) + slope dt (1 + σ²(1-t)/(2t)),
    # read off mean_of by finite differences of the (linear) map, so no coefficient is typed twice
    mean_lin = mean_of(x, slope * x + offset)
    dmean_dx = mean_of(np.ones(shape), slope * np.ones(shape)) - mean_of(np.zeros(shape), np.zeros(shape))
    score_cur = strength * dmean_dx * (x_prev - mean_lin) / col(std**2)
    x0_cur = x - col(t) * v
    x0_next = x_prev - col(t_next) * v_next  # = x_prev at the terminal step (t_next = 0)
    meta = {
        "kind": "flow_sde_step",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "scheduler_config": {"num_train_timesteps": NUM_TRAIN, "shift": shift, "use_dynamic_shifting": False},
        "num_inference_steps": num_steps,
        "shift": shift,
        "noise_level": noise_level,
        "seed": seed,
        "notes": "Flow-GRPO SDE step; x0 = x - t v; alpha_prod_* = (1 - t)^2, the reward weight's analogue of "
                 "alphas_cumprod; timestep = 1000 t (float); score_cur with v(x) = v_slope x + v_offset",
    }
    np.savez(HERE / name, meta=np.array(json.dumps(meta)), step_index=j, timestep=NUM_TRAIN * t,
             timestep_next=NUM_TRAIN * t_next, sigma=t, sigma_next=t_next, x_t=x, x_prev=x_prev, v=v,
             v_next=v_next, strength=np.float64(strength), v_slope=np.float64(slope), v_offset=offset,
             step_mean=mean, step_std=std, score_next=score_next, score_cur=score_cur, x0_cur=x0_cur,
             x0_next=x0_next, alpha_prod_cur=(1 - t) ** 2, alpha_prod_next=(1 - t_next) ** 2)
    print(f"wrote {HERE / name}")


if __name__ == "__main__":
    # SD 3.5 Medium's scheduler at 10 steps, Flow-GRPO's a = 0.7; first (t = 1) and terminal steps included
    make("flow_sde_sd35_s0.npz", 0, 10, 3.0, 0.7, [0, 1, 4, 7, 8, 9])
    # no shift, 28 steps (the SD 3 pipeline's default count), a = 1
    make("flow_sde_shift1_a1_s1.npz", 1, 28, 1.0, 1.0, [0, 3, 13, 26, 27, 27])
