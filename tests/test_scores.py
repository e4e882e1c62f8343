"""Scores through a real (tiny) UNet against finite differences, and sampler/pipeline agreement."""
import pytest
import torch

from lowmem_nablagfn.diffusion import forward_score, make_schedule, reverse_score, step_mean
from lowmem_nablagfn.models import build_random_sd
from lowmem_nablagfn.sampling import cfg_eps_fn, encode_prompts


@pytest.fixture(scope="module")
def tiny64():
    parts = build_random_sd("tiny", seed=0)
    for m in (parts.unet, parts.text_encoder):
        m.double().eval().requires_grad_(False)
    return parts


@pytest.mark.parametrize("sampler,j", [("ddim", 3), ("ddim", 9), ("dpm-solver", 2)])
def test_reverse_score_matches_finite_differences(tiny64, sampler, j):
    sched = make_schedule(sampler, 10)
    cond = encode_prompts(tiny64.text_encoder, tiny64.tokenizer, ["a cat", "a dog"], "cpu")
    uncond = encode_prompts(tiny64.text_encoder, tiny64.tokenizer, [""], "cpu")
    eps_fn = cfg_eps_fn(tiny64.unet, uncond, 5.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    x_next = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    step = torch.full((2,), j)
    t = sched.timesteps[step]

    def log_p(xx):  # log N(x_next; mean(xx), std²) up to a constant
        mean = step_mean(sched, step, xx, eps_fn(xx, t, cond))
        return -((x_next - mean) ** 2 / (2 * sched.gather("std", step, xx) ** 2)).flatten(1).sum(1)

    xg = x.clone().requires_grad_(True)
    score = reverse_score(sched, step, xg, eps_fn(xg, t, cond), x_next)
    for _ in range(3):
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        h = 1e-5
        fd = (log_p(x + h * v) - log_p(x - h * v)) / (2 * h)
        analytic = (score * v).flatten(1).sum(1)
        assert torch.allclose(fd, analytic, rtol=1e-5, atol=1e-6), (fd, analytic)
    # forward score = d/dx_next of the same log-density
    xn = x_next.clone().requires_grad_(True)
    mean = step_mean(sched, step, x, eps_fn(x, t, cond))
    lp = -((xn - mean) ** 2 / (2 * sched.gather("std", step, x) ** 2)).sum()
    (grad,) = torch.autograd.grad(lp, xn)
    assert torch.allclose(grad, forward_score(sched, step, x_next, mean), rtol=1e-10)
