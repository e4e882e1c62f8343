"""The flow-sde sampler (docs/algorithm.md, "Flow matching (SD 3.5)"): Flow-GRPO's SDE on the step grid of
diffusers' FlowMatchEulerDiscreteScheduler.  Its step math against independent vectors is in
tests/test_vectors.py; here: the grid is the pipeline's, noise 0 is the pipeline's Euler loop, the SDE
keeps a Gaussian's marginals, and mismatched samplers / configs are refused."""
import pytest
import torch

from lowmem_nablagfn.analytic import ExactVelocity, GaussianMixture, sample_final
from lowmem_nablagfn.diffusion import (SD3_SCHEDULER_CONFIG, SD_SCHEDULER_CONFIG, as_epsilon, make_schedule,
                                       reward_weight)
from lowmem_nablagfn.sampling import sample


@pytest.mark.parametrize("steps,shift", [(10, 3.0), (28, 1.0)])
def test_grid_is_the_pipeline_schedulers(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {**SD3_SCHEDULER_CONFIG, "shift": shift}
    sched = make_schedule("flow-sde", steps, 0.7, cfg)
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    assert sched.timesteps.dtype == torch.float32 and torch.equal(sched.timesteps, ref.timesteps)
    assert torch.equal(sched.next_timesteps, torch.cat([ref.timesteps[1:], torch.zeros(1)]))
    torch.testing.assert_close(sched.sigmas, ref.sigmas.double())
    assert float(sched.sigmas[0]) == 1.0 and bool((sched.std > 0).all())  # t = 1 and the terminal step: finite
    # the reward weight's ᾱ analogue: (1 - t)², so w = (1 - t)² ("squared") or 1 - t ("sqrt"); 1 at t = 0
    torch.testing.assert_close(sched.alpha_cur, (1 - sched.sigmas[:-1]) ** 2)
    torch.testing.assert_close(reward_weight(sched.alpha_cur, "sqrt"), 1 - sched.sigmas[:-1])
    assert float(sched.alpha_next[-1]) == 1.0


def _velocity(x, t, cond):
    """A nonlinear stand-in for the transformer (depends on x, t and the condition)."""
    return torch.tanh(x) * (t.view(-1, 1, 1, 1) / 1000) - 0.3 * x + cond.view(-1, 1, 1, 1)


def test_noise_level_zero_is_the_pipelines_euler_loop():
    """a = 0: the trajectory is StableDiffusion3Pipeline's denoising loop (initial latents from the
    generator, then FlowMatchEulerDiscreteScheduler.step on each velocity), to float rounding."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, shape, cond = 12, (4, 8, 8), torch.tensor([0.1, -0.2])
    sched = make_schedule("flow-sde", steps, 0.0)
    assert as_epsilon(_velocity, sched) is _velocity  # the velocity is what the step is written in
    traj = sample(_velocity, sched, cond, shape, torch.Generator().manual_seed(7))

    ref = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    ref.set_timesteps(steps)
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(7))
    for t in ref.timesteps:
        x = ref.step(_velocity(x, t.expand(2), cond), t, x).prev_sample
    torch.testing.assert_close(traj.final_latents, x, rtol=1e-5, atol=1e-5)


def test_sde_keeps_the_data_marginal():
    """With the exact velocity of a Gaussian, the noisy sampler (a = 0.7) ends at the data distribution:
    the σ_t²/(2t) (x + (1-t) v) drift is the score correction that makes the injected noise marginal-
    preserving (dropping it or flipping its sign inflates the spread several-fold)."""
    data = GaussianMixture.make([1.0], [[0.5, -1.0]], [0.4])
    sched = make_schedule("flow-sde", 40, 0.7)
    xs = sample_final(ExactVelocity(data), sched, 8000, seed=0).double()
    torch.testing.assert_close(xs.mean(0), data.means[0], atol=0.03, rtol=0)
    # 0.377 (-6 %: the Euler-Maruyama discretisation at T = 40); no correction 0.80, flipped sign 2.9
    assert abs(float(xs.std(0).mean()) / 0.4 - 1) < 0.12, float(xs.std(0).mean())


@pytest.mark.parametrize("name,eta,config,match", [
    ("flow-sde", 0.7, SD_SCHEDULER_CONFIG, "DDPM-type.*use 'ddim' or 'dpm-solver'"),
    ("ddim", 1.0, SD3_SCHEDULER_CONFIG, "flow matching.*use 'flow-sde'"),
    ("flow-sde", -0.1, SD3_SCHEDULER_CONFIG, "noise level a = -0.1 is negative"),
    ("flow-sde", 0.7, {**SD3_SCHEDULER_CONFIG, "use_dynamic_shifting": True}, "use_dynamic_shifting=True"),
    ("flow-sde", 0.7, {**SD3_SCHEDULER_CONFIG, "invert_sigmas": True}, "invert_sigmas=True"),
])
def test_mismatched_sampler_or_config_is_refused(name, eta, config, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(name, 10, eta, config)


def test_flow_config_is_recognised_by_class_name():
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    assert make_schedule("flow-sde", 5, 0.7, cfg).prediction_type == "flow_prediction"
    with pytest.raises(ValueError, match="flow matching"):
        make_schedule("dpm-solver", 5, 1.0, cfg)


def test_noise_level_zero_is_stable_diffusion_3_pipeline():
    """a = 0 with classifier-free guidance on v reproduces StableDiffusion3Pipeline's latents at a fixed
    seed on a tiny random SD3 transformer (prompt embeddings given, ``output_type="latent"``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    g = torch.Generator().manual_seed(1)
    embeds, neg_embeds = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    pooled, neg_pooled = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    steps, scale = 6, 4.5
    with torch.no_grad():
        want = pipe(prompt_embeds=embeds, negative_prompt_embeds=neg_embeds, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=neg_pooled, height=64, width=64, num_inference_steps=steps,
                    guidance_scale=scale, generator=torch.Generator().manual_seed(3), output_type="latent").images

    def guided_velocity(x, t, cond):
        out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                          encoder_hidden_states=torch.cat([neg_embeds, embeds]),
                          pooled_projections=torch.cat([neg_pooled, pooled])).sample
        v_u, v_c = out.chunk(2)
        return v_u + scale * (v_c - v_u)

    sched = make_schedule("flow-sde", steps, 0.0, dict(pipe.scheduler.config))
    traj = sample(guided_velocity, sched, torch.zeros(2, 1, 1), (4, 8, 8), torch.Generator().manual_seed(3))
    torch.testing.assert_close(traj.final_latents, want, rtol=1e-4, atol=1e-4)
    assert float(want.abs().max()) > 0.1
