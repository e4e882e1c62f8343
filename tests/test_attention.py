"""``memory.attention``: diffusers attention processors (sdpa / xformers / math), the clear error
before any model load, the planner's kernel choice per card and dtype, and the launchers' allocator
setting that the planner's fragmentation constant assumes."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from lowmem_nablagfn import models, planner
from lowmem_nablagfn import loop as T
from lowmem_nablagfn.config import ConfigError, load_config, validate

from helpers import small_config

ROOT = Path(__file__).resolve().parent.parent


def _processor_types(module):
    return {type(p).__name__ for p in module.attn_processors.values()}


def test_math_processor_gives_the_sdpa_output():
    parts = models.build_random_sd("tiny", seed=0)
    unet = parts.unet.eval()
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, unet.config.cross_attention_dim)
    models.set_attention_backend([unet, parts.vae, None], "sdpa")
    assert _processor_types(unet) == {"AttnProcessor2_0"}
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=cond).sample
    models.set_attention_backend([unet, parts.vae], "math")
    assert _processor_types(unet) == {"MathSDPAProcessor"} and _processor_types(parts.vae) == {"MathSDPAProcessor"}
    with torch.no_grad():
        got = unet(x, t, encoder_hidden_states=cond).sample
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_setup_applies_the_backend(tmp_path):
    c = T.setup(small_config(tmp_path, "memory.attention=math"))
    for module in (c.parts.unet, c.parts.vae, c.flow_model):
        assert _processor_types(module) == {"MathSDPAProcessor"}


def test_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="memory.attention='flash3'"):
        validate(load_config("tiny_cpu", ["memory.attention=flash3"]))


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_missing_is_a_clear_error_before_the_model_loads(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(T, "load_run_parts", lambda *a, **k: loaded.append(a))
    with pytest.raises(ImportError, match="pip install xformers.*memory.attention=sdpa"):
        T.setup(small_config(tmp_path, "memory.attention=xformers"))
    assert not loaded


@pytest.mark.parametrize("dtype,cap,head_dim,kernel", [
    (torch.bfloat16, (8, 0), 40, "flash"),          # A100, SD 1.5 UNet
    (torch.bfloat16, (9, 0), 160, "flash"),         # H100
    (torch.bfloat16, (8, 9), 512, "mem_efficient"),  # the VAE's one-head attention: too wide for flash
    (torch.float16, (7, 0), 40, "mem_efficient"),   # V100 fp16: no flash before sm80
    (torch.bfloat16, (7, 0), 40, "math"),           # V100 bf16: neither fused kernel
    (torch.float32, (8, 0), 40, "mem_efficient"),   # fp32 (the flow model) gets the memory-efficient one
    (torch.float32, (3, 7), 40, "math"),            # K80
])
def test_sdpa_kernel_rules(dtype, cap, head_dim, kernel):
    assert planner.sdpa_kernel(dtype, cap, head_dim) == kernel


def test_planner_names_the_kernels_and_warns_about_math():
    bf16 = load_config("sd15_rtx4090")
    m = planner.build_meta(bf16)
    assert planner.attention_kernels(bf16, m, (8, 9)) == {"unet": "flash", "vae": "mem_efficient",
                                                          "flow": "mem_efficient"}
    assert planner.attention_kernels(bf16, m, (7, 0))["unet"] == "math"
    fp16 = load_config("sd15_v100")
    assert set(planner.attention_kernels(fp16, planner.build_meta(fp16), (7, 0)).values()) == {"mem_efficient"}
    forced = load_config("sd15_rtx4090", ["memory.attention=math"])
    assert set(planner.attention_kernels(forced, m, (9, 0)).values()) == {"math"}


def test_math_kernel_is_traced_and_warned(tmp_path, monkeypatch):
    """The planner traces the math kernel's attention matrices: a larger prediction, and a note."""
    monkeypatch.setenv("LOWMEM_NABLAGFN_CACHE", str(tmp_path / "cache"))
    fused = small_config(tmp_path, "device=cuda", "memory.mode=official")
    math = small_config(tmp_path, "device=cuda", "memory.mode=official", "memory.attention=math")
    profile = planner.Probes(fused)
    a, b = planner.predict(fused, profile, (8, 0)), planner.predict(math, profile, (8, 0))
    assert not a.notes and b.notes and "math SDPA kernel" in b.notes[0]
    assert b.phases["train"] > a.phases["train"] and b.phases["sampling"] > a.phases["sampling"]


def test_every_shell_launcher_sets_expandable_segments():
    scripts = [p for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch")]
    assert scripts
    for p in scripts:
        assert re.search(r'PYTORCH_CUDA_ALLOC_CONF="\$\{PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True\}"',
                         p.read_text()), p.name
