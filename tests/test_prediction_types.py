"""The schedule and the prediction type come from the loaded model: the sampler equals diffusers'
own scheduler ``step`` (the oracle) for epsilon and v-prediction models, on SD's and on other betas;
anything else is refused before training."""
import json

import pytest
import torch

from lowmem_nablagfn.diffusion import SD_SCHEDULER_CONFIG, as_epsilon, make_schedule, pred_x0
from lowmem_nablagfn.sampling import sample

SHAPE = (4, 8, 8)
BETAS = {"sd": {}, "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 2e-2}}


def model_fn(x, t, cond):
    """A deterministic stand-in for a (guided) UNet: depends on x, t and the prompt embedding."""
    return 0.7 * x + 0.2 * torch.cos(t.float() / 97).view(-1, 1, 1, 1) + cond.mean((1, 2)).view(-1, 1, 1, 1)


def oracle(name, config, steps, cond, seed):
    """The trajectory diffusers' scheduler ``step`` gives, noise drawn as our sampler draws it."""
    from diffusers import DDIMScheduler, DPMSolverSinglestepScheduler

    gen = torch.Generator().manual_seed(seed)
    if name == "ddim":
        sched = DDIMScheduler.from_config(config)
    else:
        sched = DPMSolverSinglestepScheduler.from_config(
            {k: v for k, v in config.items() if k not in ("clip_sample", "set_alpha_to_one")},
            algorithm_type="sde-dpmsolver++", solver_order=1, final_sigmas_type="sigma_min")
    sched.set_timesteps(steps)
    x = torch.randn((cond.shape[0], *SHAPE), generator=gen) * sched.init_noise_sigma
    xs, x0s = [], []
    for t in sched.timesteps:
        out = model_fn(x, t.expand(x.shape[0]), cond)
        if name == "ddim":
            noise = torch.randn(x.shape, generator=gen)
            step = sched.step(out, t, x, eta=1.0, variance_noise=noise)
            x0s.append(step.pred_original_sample)
        else:
            step = sched.step(out, t, x, generator=gen)
        x = step.prev_sample
        xs.append(x)
    return torch.stack(xs, 1), x0s


@pytest.mark.parametrize("betas", sorted(BETAS))
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,steps", [("ddim", 10), ("dpm-solver", 8)])
def test_sampler_equals_diffusers_step(name, steps, prediction, betas):
    config = {**SD_SCHEDULER_CONFIG, **BETAS[betas], "prediction_type": prediction}
    sched = make_schedule(name, steps, 1.0, config)
    assert sched.prediction_type == prediction
    cond = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1)) * 0.1
    traj = sample(as_epsilon(model_fn, sched), sched, cond, SHAPE, torch.Generator().manual_seed(3))
    want, x0s = oracle(name, config, steps, cond, 3)
    torch.testing.assert_close(traj.next_latents, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traj.final_latents, want[:, -1], rtol=1e-4, atol=1e-5)
    if x0s:  # x̂0 from the converted ε is diffusers' pred_original_sample
        for j, x0 in enumerate(x0s):
            t = sched.timesteps[j].expand(2)
            eps = sched.to_epsilon(model_fn(traj.latents[:, j], t, cond), traj.latents[:, j], t)
            got = pred_x0(traj.latents[:, j], eps, sched.gather("alpha_cur", t.new_full((2,), j), eps))
            torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-5)
    if prediction == "v_prediction":  # the test can fail: reading v as ε gives another trajectory
        wrong = sample(model_fn, sched, cond, SHAPE, torch.Generator().manual_seed(3))
        assert (wrong.final_latents - want[:, -1]).abs().max() > 1e-2


def test_schedule_follows_the_models_betas():
    sd = make_schedule("ddim", 10, 1.0)
    linear = make_schedule("ddim", 10, 1.0, {**SD_SCHEDULER_CONFIG, **BETAS["linear"]})
    assert not torch.allclose(sd.alpha_cur, linear.alpha_cur)
    from diffusers import DDIMScheduler

    oracle_sched = DDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, **BETAS["linear"]})
    oracle_sched.set_timesteps(10)
    torch.testing.assert_close(linear.alpha_cur, oracle_sched.alphas_cumprod[oracle_sched.timesteps].double())


@pytest.mark.parametrize("kind", ["sample", "flow_prediction"])
def test_unsupported_prediction_type_is_refused(kind, tmp_path):
    with pytest.raises(ValueError, match=f"'{kind}'.*epsilon and v_prediction"):
        make_schedule("ddim", 10, 1.0, {**SD_SCHEDULER_CONFIG, "prediction_type": kind})
    # a local model directory: refused by validation, before any model is built
    from lowmem_nablagfn.config import ConfigError, load_config, validate

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": kind}))
    with pytest.raises(ConfigError, match=f"predicts '{kind}'"):
        validate(load_config("tiny_cpu", [f"pretrained.model={tmp_path}"]))


def test_trainer_uses_the_loaded_models_schedule(tmp_path):
    """A saved v-prediction model with other betas: setup's schedule is that model's, and the
    policy's ε is the converted v."""
    from lowmem_nablagfn.config import load_config
    from lowmem_nablagfn.models import build_random_sd, save_sd
    from lowmem_nablagfn.loop import policy_eps_fn, setup

    parts = build_random_sd("tiny")
    parts.scheduler_config = {**SD_SCHEDULER_CONFIG, **BETAS["linear"], "prediction_type": "v_prediction"}
    save_sd(parts, tmp_path / "model")
    cfg = load_config("tiny_cpu", [f"pretrained.model={tmp_path / 'model'}", f"logging.output_dir={tmp_path}",
                                   "logging.tensorboard=false"])
    c = setup(cfg)
    want = make_schedule("ddim", cfg.sampling.num_steps, 1.0, parts.scheduler_config)
    assert c.sched.prediction_type == "v_prediction"
    torch.testing.assert_close(c.sched.alpha_cur, want.alpha_cur)
    torch.testing.assert_close(c.sched.c_eps, want.c_eps)
    x = torch.randn(1, *c.latent_shape)
    t = c.sched.timesteps[:1]
    cond = c.uncond
    with torch.no_grad():
        from lowmem_nablagfn.sampling import cfg_eps_fn

        v = cfg_eps_fn(c.parts.unet, c.uncond, cfg.sampling.guidance_scale)(x, t, cond)
        a = want.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        torch.testing.assert_close(policy_eps_fn(c)(x, t, cond), a.sqrt() * v + (1 - a).sqrt() * x)
    c.sync.close()
