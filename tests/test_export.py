"""Export: the kohya-format LoRA has kohya's names and alphas, loads in diffusers, and gives the same
latents as the diffusers-format LoRA at a fixed seed (tiny model); ``--alpha`` never changes the model;
an SDXL LoRA is labelled SDXL without its run's config; bad input is one line and exit 2, nothing written;
exported files get the trainer's usual permissions."""
import json
import os
import shutil
import stat

import pytest
import torch

from lowmem_nablagfn.checkpoint import LORA_FILE, save_lora
from lowmem_nablagfn.cli import main
from lowmem_nablagfn.export import base_model, diffusers_to_kohya, export_lora, set_alpha
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
    assert meta["ss_base_model_version"] == "sd_v1"  # kohya's value for SD 1.x (A1111 shows it with SD 1.x)
    # the weights themselves are the diffusers file's, renamed
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"
    assert torch.equal(state[f"{key}.lora_down.weight"], diffusers_state[name])
    # another alpha is written as given, the up-weights rescaled by old / new alpha: (alpha / r) up @ down stays
    kohya = diffusers_to_kohya(diffusers_state)
    rescaled = set_alpha(kohya, 8.0)
    assert all(float(v) == 8.0 for k, v in rescaled.items() if k.endswith("alpha"))
    assert torch.equal(rescaled[f"{key}.lora_up.weight"], kohya[f"{key}.lora_up.weight"] * 0.5)
    assert torch.equal(rescaled[f"{key}.lora_down.weight"], kohya[f"{key}.lora_down.weight"])


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


# ----------------------------------------------------------------------------- the model never changes

@pytest.fixture(scope="module")
def pipe(run):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(run / "base"), safety_checker=None)


def unet_output(pipe, lora=None):
    """The tiny UNet's output (2, 4, 8, 8) at fixed inputs with ``lora`` loaded by diffusers' own
    ``load_lora_weights`` (the independent reference for what a LoRA file does), or without one."""
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)
    pipe.unload_lora_weights()
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=context).sample


def test_alpha_option_never_changes_the_model(run, pipe, tmp_path):
    """``--alpha`` writes the alpha asked for and rescales the up-weights, so the LoRA does exactly what the
    trained one does (before the fix ``--alpha 8`` doubled its effect); also when re-exporting a kohya file."""
    trained = unet_output(pipe, run / "run" / "lora")
    assert not torch.allclose(trained, unet_output(pipe), atol=1e-3)  # the LoRA does something
    for alpha in ("8", "1", "3", "0.5"):
        out = tmp_path / f"alpha-{alpha}.safetensors"
        assert main(["export", str(run / "run"), "--alpha", alpha, "--out", str(out)]) == 0
        state, meta = load_lora_file(out)
        assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {float(alpha)}
        assert meta["ss_network_alpha"] == str(float(alpha))
        got = unet_output(pipe, out)
        assert torch.allclose(got, trained, atol=1e-6, rtol=1e-5), (alpha, (got - trained).abs().max())
    again = tmp_path / "kohya-to-kohya.safetensors"
    assert main(["export", str(tmp_path / "alpha-8.safetensors"), "--alpha", "2", "--out", str(again)]) == 0
    got = unet_output(pipe, again)
    assert torch.allclose(got, trained, atol=1e-6, rtol=1e-5), (got - trained).abs().max()


# ----------------------------------------------------------------------------- SDXL without its run's config

def sdxl_shaped_lora(rank=4):
    """A diffusers-format LoRA with SDXL base's attention shapes (cross-attention inputs 2048 wide) on a few
    blocks, and the kohya (SGM) names each block must get: no model needed."""
    blocks = {"down_blocks.1.attentions.0": (640, "input_blocks_4_1"),
              "down_blocks.1.attentions.1": (640, "input_blocks_5_1"),
              "mid_block.attentions.0": (1280, "middle_block_1"),
              "up_blocks.0.attentions.2": (1280, "output_blocks_2_1")}
    gen = torch.Generator().manual_seed(0)
    state, names = {}, {}
    for block, (width, sgm) in blocks.items():
        for module, inputs in (("attn1.to_q", width), ("attn2.to_k", 2048)):
            prefix = f"unet.{block}.transformer_blocks.0.{module}.lora"
            state[f"{prefix}.down.weight"] = torch.randn(rank, inputs, generator=gen)
            state[f"{prefix}.up.weight"] = torch.randn(width, rank, generator=gen)
            names[prefix] = f"lora_unet_{sgm}_transformer_blocks_0_{module.replace('.', '_')}"
    return state, names


def test_loose_sdxl_file_is_labelled_sdxl(tmp_path):
    """A loose SDXL LoRA file (no config.json near it) gets SDXL's block names and
    ``ss_base_model_version = sdxl_base_v1-0`` (before the fix the width check also counted the up-weights
    of ``down_blocks``, so it was written as SD 1.x, which A1111 hides while an SDXL model is loaded)."""
    from safetensors.torch import save_file

    state, names = sdxl_shaped_lora()
    (tmp_path / "loose").mkdir()
    save_file(state, str(tmp_path / "loose" / "my_sdxl_lora.safetensors"))
    out = export_lora(str(tmp_path / "loose" / "my_sdxl_lora.safetensors"), tmp_path / "k.safetensors", "kohya")
    kohya, meta = load_lora_file(out)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    for prefix, name in names.items():
        assert torch.equal(kohya[f"{name}.lora_down.weight"], state[f"{prefix}.down.weight"]), name
        assert float(kohya[f"{name}.alpha"]) == 4.0


@pytest.mark.parametrize("key", ["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight",
                                 "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
                                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"])
def test_base_model_of_a_loose_file_by_cross_attention_width(key):
    """Diffusers, peft and kohya names; the up-weight (width r) is not counted; unknown widths say nothing."""
    up = key.replace("lora.down", "lora.up").replace("lora_A", "lora_B").replace("lora_down", "lora_up")
    expected = {768: ("sd_v1", None), 1024: ("sd_v2", None), 2048: ("sdxl_base_v1-0", 2), 80: None}
    for width, want in expected.items():
        got = base_model(None, {key: torch.zeros(4, width), up: torch.zeros(640, 4)})
        assert (got if got is None else tuple(got)) == want, (key, width, got)


# ----------------------------------------------------------------------------- bad input

def _files(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


BAD_INPUT = {  # case: (arguments, with {run} {src} {out} {lora} filled in, what the one line must say)
    "alpha nan": (["{run}", "--alpha", "nan", "--out", "{out}"], "--alpha nan"),
    "alpha negative": (["{run}", "--alpha", "-4", "--out", "{out}"], "--alpha -4.0"),
    "alpha zero": (["{run}", "--alpha", "0", "--out", "{out}"], "--alpha 0.0"),
    "alpha inf": (["{run}", "--alpha", "inf", "--out", "{out}"], "--alpha inf"),
    "alpha for diffusers": (["{run}", "--format", "diffusers", "--alpha", "8", "--out", "{out}"], "--format kohya"),
    "corrupt source": (["{src}/garbage.safetensors", "--out", "{out}"], "garbage.safetensors"),
    "truncated source": (["{src}/truncated.safetensors", "--out", "{out}"], "truncated.safetensors"),
    "missing source": (["{src}/missing", "--out", "{out}"], "missing: no such file"),
    "out is the source, kohya": (["{run}", "--out", "{lora}"], "is the source"),
    "out is the source, diffusers": (["{run}", "--format", "diffusers", "--out", "{lora}"], "is the source"),
    "out is the source, spelt otherwise": (["{lora}", "--format", "diffusers",
                                            "--out", "{run}/lora/../lora/" + LORA_FILE], "is the source"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(run, tmp_path, capsys, case):
    shutil.copytree(run / "run", tmp_path / "run")  # a copy: the run's LoRA must survive even a failing test
    (tmp_path / "src").mkdir()
    lora = tmp_path / "run" / "lora" / LORA_FILE
    (tmp_path / "src" / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (tmp_path / "src" / "truncated.safetensors").write_bytes(lora.read_bytes()[: lora.stat().st_size // 2])
    args, says = BAD_INPUT[case]
    fill = dict(run=tmp_path / "run", src=tmp_path / "src", out=tmp_path / "new" / "x.safetensors", lora=lora)
    before = _files(tmp_path)
    assert main(["export", *(a.format(**fill) for a in args)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("lowmem-nablagfn export: ") and says in err, err
    assert _files(tmp_path) == before and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- permissions

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_usual_modes(run, tmp_path, umask):
    """0666 under the umask, as the trainer's files (``checkpoint.usual_modes``); safetensors alone writes 0600."""
    old = os.umask(umask)
    try:
        for fmt, dtype in (("kohya", "fp16"), ("kohya", "fp32"), ("diffusers", "fp16"), ("diffusers", "fp32")):
            out = tmp_path / f"{fmt}-{dtype}.safetensors"
            out.write_bytes(b"an older export")
            out.chmod(0o600)
            export_lora(str(run / "run"), out, fmt, dtype)
            assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask, (fmt, dtype, oct(out.stat().st_mode))
        written = sorted(f"{f}-{d}.safetensors" for f in ("kohya", "diffusers") for d in ("fp16", "fp32"))
        assert sorted(p.name for p in tmp_path.iterdir()) == written  # no temporaries left
    finally:
        os.umask(old)
