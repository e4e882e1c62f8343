"""Our sampler draws noise like diffusers' StableDiffusionPipeline: same latents for both samplers."""
import pytest
import torch

from lowmem_nablagfn.diffusion import make_schedule
from lowmem_nablagfn.models import build_random_sd, make_pipeline
from lowmem_nablagfn.sampling import cfg_eps_fn, encode_prompts, sample


@pytest.fixture(scope="module")
def tiny():
    return build_random_sd("tiny", seed=0)


@pytest.mark.parametrize("sampler,steps", [("ddim", 6), ("dpm-solver", 5)])
def test_sampler_matches_pipeline(tiny, sampler, steps):
    from diffusers import DPMSolverSinglestepScheduler

    sched = make_schedule(sampler, steps)
    pipe = make_pipeline(tiny)
    if sampler == "dpm-solver":
        pipe.scheduler = DPMSolverSinglestepScheduler.from_config(sched.scheduler_config)
    prompts = ["a cat", "a red house"]
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, eta=1.0, height=64, width=64,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    cond = encode_prompts(tiny.text_encoder, tiny.tokenizer, prompts, "cpu")
    uncond = encode_prompts(tiny.text_encoder, tiny.tokenizer, [""], "cpu")
    keep = torch.tensor([[steps - 1, 0], [steps - 1, 2]])
    traj = sample(cfg_eps_fn(tiny.unet, uncond, 5.0), sched, cond, (4, 8, 8), torch.Generator().manual_seed(7),
                  keep=keep, prompts=prompts)
    assert torch.allclose(traj.final_latents, out, atol=1e-4, rtol=1e-4), (traj.final_latents - out).abs().max()
    # stored transitions: the last one ends at x_0, consecutive kept steps chain
    assert torch.allclose(traj.next_latents[:, 0], traj.final_latents)
    assert traj.step_index.tolist() == keep.tolist()
