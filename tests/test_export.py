"""Export: the kohya-format LoRA has kohya's names and alphas, loads in diffusers, and gives the same
latents as the diffusers-format LoRA at a fixed seed (tiny model)."""
import json

import pytest
import torch

from lowmem_nablagfn.checkpoint import LORA_FILE, save_lora
from lowmem_nablagfn.cli import main
from lowmem_nablagfn.export import diffusers_to_kohya, export_lora
from lowmem_nablagfn.targets import load_lora_file, resolve_target
from lowmem_nablagfn.models import add_lora, build_random_sd, save_sd

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def randomise_lora(unet, seed=0, std=0.3):
    """Non-zero ``lora_B`` (peft's gaussian init leaves it zero: the adapter would be a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    parts = build_random_sd("tiny", seed=0)
    save_sd(parts, root / "base")
    add_lora(parts.unet, 4, TARGETS, "gaussian", seed=0)
    randomise_lora(parts.unet)
    (root / "run" / "lora").mkdir(parents=True)
    save_lora(parts.unet, root / "run" / "lora")
    (root / "run" / "config.json").write_text(json.dumps({"pretrained": {"model": str(root / "base")}}))
    return root


def test_kohya_names_and_alpha(run, tmp_path):
    out = export_lora(str(run / "run"), tmp_path / "k.safetensors", "kohya")
    state, meta = load_lora_file(out)
    diffusers_state, _ = load_lora_file(run / "run" / "lora" / LORA_FILE)
    downs = [k for k in state if k.endswith(".lora_down.weight")]
    assert len(downs) * 3 == len(state) and len(downs) * 2 == len(diffusers_state)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state[f"{key}.lora_down.weight"].shape == (4, 64)
    assert state[f"{key}.lora_up.weight"].shape == (64, 4)
    assert float(state[f"{key}.alpha"]) == 4.0  # lora_alpha = rank: scale 1
    assert "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in state
    assert all(k.startswith("lora_unet_") for k in state)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    # the weights themselves are the diffusers file's, renamed
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"
    assert torch.equal(state[f"{key}.lora_down.weight"], diffusers_state[name])
    # and the explicit alpha option is written as given
    assert all(float(v) == 8.0 for k, v in diffusers_to_kohya(diffusers_state, alpha=8).items() if k.endswith("alpha"))


def test_kohya_file_loads_in_diffusers_and_gives_same_latents(run, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert main(["export", str(run / "run"), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(run / "base"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def latents():
        return pipe(["a cat", "a dog"], num_inference_steps=3, guidance_scale=5.0, eta=1.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    pipe.load_lora_weights(str(run / "run" / "lora"))
    with_diffusers = latents()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(tmp_path / "k.safetensors"))
    with_kohya = latents()
    pipe.unload_lora_weights()
    base = latents()
    assert torch.allclose(with_kohya, with_diffusers, atol=1e-5, rtol=1e-5), (with_kohya - with_diffusers).abs().max()
    assert not torch.allclose(base, with_diffusers, atol=1e-3)  # the LoRA does something


def test_resolve_target_and_errors(run, tmp_path):
    t = resolve_target(str(run / "run"))
    assert t.lora_file == run / "run" / "lora" / LORA_FILE and t.config_file == run / "run" / "config.json"
    assert resolve_target(str(run / "run" / "lora")).run_dir == run / "run"
    assert resolve_target("base").lora_file is None
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_target(str(tmp_path / "missing"))
    out = export_lora(str(run / "run" / "lora" / LORA_FILE), tmp_path / "d.safetensors", "diffusers", "fp16")
    assert all(v.dtype == torch.float16 for v in load_lora_file(out)[0].values())
    assert main(["export", "base", "--out", str(tmp_path / "x.safetensors")]) == 2
