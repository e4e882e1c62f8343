"""The model-family adapter (lowmem_nablagfn/models/family.py) on tiny-sd3: prompts -> cached conditioning ->
guided velocity -> flow-sde at noise 0 -> VAE decode is StableDiffusion3Pipeline's image at a fixed seed;
the LoRA trains through it; the UNet family's call (sampling.cfg_eps_fn) is the guided UNet."""
import pytest
import torch

from lowmem_nablagfn.diffusion import as_epsilon, make_schedule
from lowmem_nablagfn.images import decode_latents
from lowmem_nablagfn.models import build_random_sd
from lowmem_nablagfn.models.family import SD3Family, UNetFamily, cfg_model_fn, family_of, prompt_table
from lowmem_nablagfn.models.lora import add_lora
from lowmem_nablagfn.models.sd3 import MODEL_PARTS, TextOptions, build_random_sd3, sd3_pipeline
from lowmem_nablagfn.sampling import cfg_eps_fn, sample

PROMPTS = ["a red apple", "a photo of a dog riding a horse"]
OPTIONS = TextOptions(max_sequence_length=32)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return prompt_table("tiny-sd3", None, 0, OPTIONS, PROMPTS, "tiny-sd3-test-train",
                        cache_dir=tmp_path_factory.mktemp("cache"))


def test_prompts_to_images_is_stable_diffusion_3_pipeline(table):
    """The whole SD 3 path at a = 0, text encoders gone (the table came from the cache's own load):
    same images as StableDiffusion3Pipeline(prompts, guidance 4.5, 4 steps, seed 3), shift factor and all."""
    parts = build_random_sd3("tiny-sd3", seed=0, parts=MODEL_PARTS, text_options=OPTIONS)
    assert parts.text_encoders == [] and family_of(parts) is SD3Family
    family = family_of(parts)
    sched = make_schedule("flow-sde", 4, 0.0, parts.scheduler_config)
    model_fn = cfg_model_fn(family, parts.transformer, table.uncond, 4.5)
    assert as_epsilon(model_fn, sched) is model_fn
    traj = sample(model_fn, sched, table.encode(PROMPTS, "cpu"), family.latent_shape(parts, 64),
                  torch.Generator().manual_seed(3))
    images = decode_latents(parts.vae, traj.final_latents)

    full = build_random_sd3("tiny-sd3", seed=0, text_options=OPTIONS)
    with torch.no_grad():
        want = sd3_pipeline(full)(PROMPTS, height=64, width=64, num_inference_steps=4, guidance_scale=4.5,
                                  max_sequence_length=32, generator=torch.Generator().manual_seed(3),
                                  output_type="pt").images
    assert images.shape == want.shape == (2, 3, 64, 64)
    torch.testing.assert_close(images, want, rtol=1e-4, atol=1e-4)
    assert float(want.std()) > 0.01


def test_lora_trains_through_the_guided_velocity(table):
    """One backward of a loss on the guided velocity reaches every LoRA weight of both streams but the
    last block's text-query one, which no output depends on."""
    parts = build_random_sd3("tiny-sd3", seed=0, parts=MODEL_PARTS, text_options=OPTIONS)
    params = add_lora(parts.transformer, 4, list(SD3Family.lora_targets), "default", seed=0)
    with torch.no_grad():
        for name, p in parts.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model_fn = cfg_model_fn(SD3Family, parts.transformer, table.uncond, 4.5)
    x = torch.randn(2, *SD3Family.latent_shape(parts, 64), generator=torch.Generator().manual_seed(0))
    model_fn(x, torch.tensor([900.0, 400.0]), table.encode(PROMPTS, "cpu")).square().mean().backward()
    names = {id(p): n for n, p in parts.transformer.named_parameters()}
    dead = {names[id(p)] for p in params if p.grad is None or not bool(p.grad.any())}
    # the last block's text queries feed no output (context_pre_only: its text stream ends there)
    assert dead == {f"transformer_blocks.1.attn.add_q_proj.lora_{ab}.default.weight" for ab in "AB"}, dead


def test_unet_family_is_the_guided_unet_call():
    """The UNet family's guided call (what sampling.cfg_eps_fn now is) against the UNet called by hand:
    ε_u + w (ε_c - ε_u), SDXL's pooled embeddings and time ids with each half."""
    parts = build_random_sd("tiny-sdxl", seed=0)
    uncond, cond = parts.uncond("cpu", 64), parts.encode(PROMPTS, "cpu", 64)
    assert family_of(parts) is UNetFamily and UNetFamily.latent_shape(parts, 64) == (4, 8, 8)
    assert family_of(parts.unet) is UNetFamily and family_of(build_random_sd3("tiny-sd3", parts=("transformer",))
                                                            .transformer) is SD3Family
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 20])
    with torch.no_grad():
        def unet(c):
            return parts.unet(x, t, encoder_hidden_states=c.prompt_embeds, added_cond_kwargs={
                "text_embeds": c.pooled_embeds, "time_ids": c.time_ids}).sample

        by_hand = unet(uncond.expand_rows(2)) + 5.0 * (unet(cond) - unet(uncond.expand_rows(2)))
        torch.testing.assert_close(cfg_eps_fn(parts.unet, uncond, 5.0)(x, t, cond), by_hand, rtol=1e-5, atol=1e-5)
        assert float((by_hand - unet(cond)).abs().max()) > 1e-3  # the guidance did something


def test_resolution_is_checked_against_the_transformer():
    parts = build_random_sd3("tiny-sd3", seed=0, parts=("vae",))
    assert SD3Family.resolution_problem(parts, 64) is None
    assert "multiples of 16 px" in SD3Family.resolution_problem(parts, 72)
    assert "up to 256 px" in SD3Family.resolution_problem(parts, 512)
