"""The first five minutes: the tiny model's decoder makes colour visible, presets name live hub repos,
and starting a command prints nothing the user did not ask for."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lowmem_nablagfn.config import list_presets, load_config
from lowmem_nablagfn.models import LATENT_RGB, build_random_sd


def test_tiny_decoder_is_the_smooth_latent_preview():
    """decode(z) = LATENT_RGB^T u, u = z upsampled (nearest + [1 2 1]² blur, three times) / its RMS."""
    vae = build_random_sd("tiny").vae.eval()
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z = z + torch.tensor([0.5, -1, 2, 0])[:, None, None]
    with torch.no_grad():
        out = vae.decode(z).sample
    u, k = z, torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    for _ in range(3):
        u = F.conv2d(F.interpolate(u, scale_factor=2, mode="nearest"), k.expand(4, 1, 3, 3), padding=1, groups=4)
    u = u / (u.pow(2).mean((2, 3), keepdim=True) + 1e-6).sqrt()
    ref = torch.einsum("bjhw,jc->bchw", u, torch.tensor(LATENT_RGB))
    assert out.shape == (3, 3, 64, 64)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_tiny_decoder_lets_a_colour_shift_through():
    """A random decoder's last GroupNorm removes each image's mean colour; this one does not: moving the
    latents along the redness direction makes the decoded image redder."""
    vae = build_random_sd("tiny").vae.eval()
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    rgb = torch.tensor(LATENT_RGB)
    red_dir = (rgb[:, 0] - rgb[:, 1:].mean(1))[:, None, None]  # d(redness)/du per latent channel

    def redness(x):
        x = (x / 2 + 0.5).clamp(0, 1)
        return (x[:, 0] - (x[:, 1] + x[:, 2]) / 2).mean().item()

    with torch.no_grad():
        before, after = redness(vae.decode(z).sample), redness(vae.decode(z + 2 * red_dir.sign()).sample)
    assert after > before + 0.15, (before, after)


@pytest.mark.parametrize("preset", list_presets())
def test_presets_name_live_hub_repositories(preset):
    model = load_config(preset).pretrained.model
    assert not model.startswith("runwayml/"), f"{preset}: runwayml/* was withdrawn in 2024"


def test_readme_names_no_withdrawn_repository():
    import glob

    root = os.path.join(os.path.dirname(__file__), "..")
    for path in [os.path.join(root, "README.md"), *glob.glob(os.path.join(root, "docs", "*.md"))]:
        text = open(path).read()
        assert "runwayml/" not in text.replace("`runwayml/stable-diffusion-v1-5`, withdrawn", ""), path


def test_quiet_start_no_optional_dependency_noise():
    """Building the default job's models prints nothing on stderr (bitsandbytes, imported by diffusers
    and peft whenever installed, warns about a 4-bit kernel package on some CPUs)."""
    code = ("from lowmem_nablagfn.config import load_config; from lowmem_nablagfn.loop import setup; "
            "import tempfile; setup(load_config('tiny_cpu', ['logging.output_dir=' + tempfile.mkdtemp(), "
            "'logging.tensorboard=false']))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == "", proc.stderr[-2000:]


def test_known_noise_is_dropped_and_other_warnings_of_its_loggers_are_not():
    """Importing bitsandbytes (as diffusers and peft do) offline prints the `kernels` package's trust-check
    line; after ``import lowmem_nablagfn`` that line is gone, while any other warning of the same loggers
    still reaches stderr.  The control (without the package) proves the noise exists in this install."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    probe = ("import logging\n{pre}import bitsandbytes\n"
             "logging.getLogger('kernels._internals.hf_hub').warning('a real kernels warning')\n"
             "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('a real bitsandbytes warning')\n")
    run = lambda pre: subprocess.run([sys.executable, "-c", probe.format(pre=pre)], env=env, capture_output=True,
                                     text=True, timeout=300)
    control, quiet = run(""), run("import lowmem_nablagfn\n")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "a real kernels warning" in quiet.stderr and "a real bitsandbytes warning" in quiet.stderr
    import lowmem_nablagfn

    for name, prefixes in lowmem_nablagfn.KNOWN_NOISE.items():
        assert not any(p in quiet.stderr for p in prefixes), quiet.stderr
    noisy = [p for prefixes in lowmem_nablagfn.KNOWN_NOISE.values() for p in prefixes if p in control.stderr]
    if not noisy:
        pytest.skip("this install's bitsandbytes prints no known noise (no `kernels` package or no AVX512-BF16): "
                    "only the pass-through half was checked")


def test_eval_models_load_without_diffusers_empty_float32_warning():
    import logging

    from lowmem_nablagfn.config import validate
    from lowmem_nablagfn.evaluate import load_models

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        build_random_sd("tiny").unet.to(dtype=torch.float32)  # the control: diffusers' own cast warns
        control = [r for r in records if "float32" in r.getMessage()]
        records.clear()
        load_models(validate(load_config("tiny_cpu")), None)
    finally:
        logger.removeHandler(handler)
    assert control, "diffusers no longer warns on a cast: this test no longer checks anything"
    assert not [r.getMessage() for r in records if "float32" in r.getMessage()]
